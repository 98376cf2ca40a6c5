"""The tenant's adapter routes of the ingress: upload, list, read and delete adapters, OpenAI's
model delete, and vLLM's load_lora_adapter / unload_lora_adapter. A change reaches every ingress
replica's resolve cache before it is answered. A mixin of `Ingress`, whose state (auth, store,
limits, resolve cache) the methods read; Serve binds the routes of every class in the
deployment's MRO.
"""
import asyncio
import logging
import shutil
from pathlib import Path

from fastapi import Request
from fastapi.responses import PlainTextResponse
from ray import serve

from adapter_store.errors import AdapterNotFoundError, InvalidNameError
from adapter_store.names import parse_ref

from deployments.errors import BadRequestError, NotFoundError, PermissionDeniedError
from deployments.http_app import api
from deployments.schemas import AdapterCard, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

logger = logging.getLogger("ray.serve")
_BROADCAST_TIMEOUT_S = 10.0


def adapter_card(info) -> AdapterCard:
    return AdapterCard(id=info.name, name=info.name, version=str(info.version), owner=info.tenant,
                       shared=bool(info.shared), manifest=dict(info.manifest or {}))


class AdapterRoutes:
    @api.post("/v1/adapters", status_code=201)
    async def upload_adapter(self, request: Request) -> dict:
        from deployments.uploads import read_upload

        tenant = self._auth.tenant_of(request.headers)
        with self._limiter.held(tenant):  # an upload holds disk while it lasts: one of the tenant's places
            name, tmp = await read_upload(request, self._upload_limits.max_adapter_bytes)
            try:
                self._check_not_base_name(name, "name")
            except BadRequestError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return adapter_card(await self._put(tenant, name, tmp)).model_dump()

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest, request: Request):
        """vLLM's runtime loading: the adapter files in `lora_path`, a directory on this
        machine, become a new version of the caller's adapter `lora_name`, for every replica.
        Off unless the operator allows it: a tenant could otherwise read the server's files."""
        tenant = self._auth.tenant_of(request.headers)
        if not self._args.allow_lora_path_uploads:
            raise PermissionDeniedError(
                "loading adapters from a path on the server is turned off here; upload the "
                "files with POST /v1/adapters (or ask the operator to allow lora_path uploads)",
                code="lora_path_uploads_disabled", param="lora_path")
        from deployments.uploads import copy_adapter_files

        self._check_not_base_name(body.lora_name, "lora_name")
        with self._limiter.held(tenant):
            tmp = await asyncio.to_thread(copy_adapter_files, Path(body.lora_path),
                                          self._upload_limits.max_adapter_bytes)
            await self._put(tenant, body.lora_name, tmp)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    def _check_not_base_name(self, name: str, field: str) -> None:
        # `model=<name>` names the base model: such an adapter would be reachable only as '<base>:<name>'
        if name == self._args.model_name():
            raise BadRequestError(f"{name!r} is the served model's name; give the adapter another",
                                  code="reserved_name", param=field)

    async def _put(self, tenant: str, name: str, tmp: Path):
        """Store the adapter files in `tmp` (removed after) as a new version of `name`."""
        try:
            info = await asyncio.to_thread(self._store.put, tenant, name, tmp, self._base_dir,
                                           limits=self._upload_limits)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            await self._invalidate_everywhere(name)  # the new version is "latest" from now on
        logger.info("tenant %s uploaded adapter %s@%s", tenant, info.name, info.version)
        return info

    async def _invalidate_everywhere(self, name: str) -> None:
        """Forget `name` in every ingress replica's resolve cache before answering, so the
        change shows at once whichever replica a client's next request reaches; if a replica
        cannot be told, the resolve TTL still bounds how long it serves the old version."""
        self._resolved.invalidate(name)
        self._listings.invalidate(name)
        try:
            context = serve.get_replica_context()
            handle = serve.get_deployment_handle(context.deployment, context.app_name)
            await asyncio.wait_for(handle.broadcast("invalidate_resolved", name).results_async(),
                                   timeout=_BROADCAST_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - e.g. a replica starting or stopping
            logger.warning("could not tell every ingress replica about %r: %s: %s", name,
                           type(exc).__name__, exc)

    async def invalidate_resolved(self, name: str) -> None:
        """Called on every ingress replica (handle.broadcast) after an upload or delete."""
        self._resolved.invalidate(name)
        self._listings.invalidate(name)

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> dict:
        tenant = self._auth.tenant_of(request.headers)
        adapters = await asyncio.to_thread(self._store.list_adapters, tenant)
        return {"object": "list", "data": [adapter_card(a).model_dump() for a in adapters]}

    @api.get("/v1/adapters/{name:path}")
    async def get_adapter(self, name: str, request: Request) -> dict:
        tenant = self._auth.tenant_of(request.headers)
        try:
            info = await self._resolved.resolve(tenant, name)
        except AdapterNotFoundError as exc:
            raise _no_such_adapter(name) from exc
        card = adapter_card(info).model_dump()
        if info.tenant == tenant:
            versions = await asyncio.to_thread(self._store.list_versions, tenant, info.name)
            card["versions"] = [str(v.version) for v in versions]
        return card

    @api.delete("/v1/adapters/{name:path}")
    async def delete_adapter(self, name: str, request: Request, version: str | None = None):
        """One version (`?version=` or `name@version` in the path, as GET takes it) or the whole
        adapter; `owner/name` names the caller's own only: another tenant's is not found here."""
        tenant = self._auth.tenant_of(request.headers)
        ref = name if version is None else f"{name}@{version}"
        try:
            parsed = parse_ref(ref)
        except InvalidNameError as exc:
            raise BadRequestError(str(exc), code="invalid_name") from exc
        if parsed.owner not in (None, tenant):
            raise _no_such_adapter(ref)
        try:
            await self._delete(tenant, parsed.name, parsed.version)
        except AdapterNotFoundError as exc:
            raise _no_such_adapter(ref) from exc
        return {"id": ref, "object": "adapter", "deleted": True}

    @api.delete("/v1/models/{model:path}")
    async def delete_model(self, model: str, request: Request) -> dict:
        """OpenAI's delete of a fine-tuned model (the SDK's `models.delete`): the caller's own
        adapter that `model` names as a request would (every version, or `name@version`'s)."""
        tenant = self._auth.tenant_of(request.headers)
        ref = self._adapter_ref(model)
        if ref is None:
            raise PermissionDeniedError(f"{model!r} is the served base model; only your adapters can be "
                                        "deleted", code="model_not_deletable", param="model")
        try:
            parsed = parse_ref(ref)
        except InvalidNameError as exc:
            raise BadRequestError(str(exc), code="invalid_model", param="model") from exc
        if parsed.owner not in (None, tenant):  # another tenant's shared adapter is not the caller's
            raise self._unknown_model(model)
        try:
            await self._delete(tenant, parsed.name, parsed.version)
        except AdapterNotFoundError as exc:
            raise self._unknown_model(model) from exc
        return {"id": model, "object": "model", "deleted": True}

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest, request: Request):
        """vLLM's runtime unloading: deletes every version of the caller's `lora_name`."""
        tenant = self._auth.tenant_of(request.headers)
        try:
            await self._delete(tenant, body.lora_name, None)
        except AdapterNotFoundError as exc:
            raise NotFoundError(f"the LoRA adapter {body.lora_name!r} cannot be found",
                                code="adapter_not_found", param="lora_name") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _delete(self, tenant: str, name: str, version: str | None) -> None:
        try:
            await asyncio.to_thread(self._store.delete, tenant, name, version)
        finally:  # a delete that failed half-way may still have removed versions
            await self._invalidate_everywhere(name)
        logger.info("tenant %s deleted adapter %s (version %s)", tenant, name, version or "all")


def _no_such_adapter(ref: str) -> NotFoundError:
    """The 404 of an adapter route: the adapter is in the path, no field of a body (param null),
    and a tenant finds theirs through the API, not the operator's CLI."""
    return NotFoundError(f"adapter {ref!r} not found; GET /v1/adapters lists yours and the shared ones",
                         code="adapter_not_found")

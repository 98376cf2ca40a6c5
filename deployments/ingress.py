"""`Ingress`: the FastAPI edge. Auth -> tenant, resolve `model`, route to an LLMServer. The
adapter routes (upload, list, delete) are its mixin in adapter_routes.py.

Completions go with `multiplexed_model_id = "<owner>/<adapter>@<version>"` so they land
on replicas holding that adapter version; a new upload is a new version and therefore a
new id, visible at once on every replica. A hot adapter (hot_adapters.py) goes in the payload
instead, so Serve balances it over every replica. Logs carry request ids, never prompts.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
import ray
from ray import serve

from adapter_store.errors import AdapterNotFoundError, InvalidNameError
from adapter_store.validate import load_base_model

from deployments.adapter_routes import AdapterRoutes
from deployments.args import AppArgs
from deployments.auth import TENANT_HEADER
from deployments.choices import choice_payloads, collect_choices, first_items, merged_events
from deployments.errors import (APIError, BadRequestError, NotFoundError, ServiceUnavailableError,
                                UnprocessableError)
from deployments.http_app import api
from deployments.http_guards import (bound_direct_ingress_receive, default_max_body_bytes,
                                     map_large_allocations)
from deployments.loop_lag import LoopLag
from deployments.metrics import EXPOSITION_CONTENT_TYPE
from deployments.openai_format import CHAT, COMPLETION, ResponseBuilder, sse_events
from deployments.replica_stream import (EndingStreamingResponse, StreamEnd, collect, error_from_item,
                                        first_item, lost_replica)
from deployments.server_timing import ServerTiming
from deployments.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                 TokenizeRequest)
from engine.heap import freeze_startup_heap

logger = logging.getLogger("ray.serve")
# store.list_adapters(t) is t's own adapters, then every other tenant's shared ones: keeping
# only the shared ones gives all shared adapters and no private one, whoever t is.
_ANY_TENANT = "anonymous"
# on a /v1/models answer that lists adapters from memory because the store did not answer
STALE_LIST_HEADER = "X-Moeplex-Stale-List"
READY_ANSWER_S = 1.0  # how long /ready reuses an engine replica's answer (Ingress._engine_ready)
READY_TIMEOUT_S = 4.0  # /ready's 503 when no engine replica answers by then (probes time out too)
SCALED_TO_ZERO = "scaled_to_zero"  # /ready's engine field when autoscaling runs no engine replica

def _in_ray_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _made_for(info) -> dict:
    """The base model record in an adapter version's manifest (adapter_store.validate), {} if none."""
    return (info.manifest or {}).get("base_model") or {}


@serve.deployment
@serve.ingress(api)
class Ingress(AdapterRoutes):
    def __init__(self, llm, args: AppArgs, created: int | None = None, keys=None):
        """keys: the KeyFile build_app read from args.api_keys (None: read it here)."""
        from deployments.auth import TenantAuth
        from deployments.hot_adapters import HotAdapters
        from deployments.limits import TenantLimiter
        from deployments.metrics import IngressMetrics, MetricsPage, node_metrics_url
        from deployments.model_files import ensure_model
        from deployments.resolve_cache import LastListings, ResolveCache

        if args.engine_transport == "grpc":
            # Serve's replica-to-replica gRPC; the payloads and items are plain dicts, for which
            # the standard library's pickle does what cloudpickle (the default) does, faster
            llm = llm.options(_by_reference=False, request_serialization="pickle",
                              response_serialization="pickle")
        self._llm = llm
        self._args = args
        self._started = created or int(time.time())  # the base model card's `created` (build_app's time)
        self._ready_answer: tuple[float, dict] | None = None  # (when, an engine replica's ready())
        self._ready_call: asyncio.Future | None = None
        self._clock = time.monotonic
        in_actor = _in_ray_actor()  # not a test that builds the ingress in its own process
        if in_actor:
            map_large_allocations()  # request bodies' memory goes back once they are read
            bound_direct_ingress_receive()  # and a body waits for the app (HAProxy mode)
        self._auth = TenantAuth(keys) if keys is not None else TenantAuth.from_file(args.api_keys)
        self._limiter = TenantLimiter(args.max_concurrent_requests_per_tenant,
                                      self._auth.max_concurrent, args.num_ingress_replicas())
        self._store = args.open_store()
        self._resolved = ResolveCache(self._store.resolve, args.adapter_resolve_ttl_s)
        self._listings = LastListings(lambda tenant: self._store.list_adapters(tenant))
        self._hot = HotAdapters(args.hot_adapter_share, args.max_engine_replicas())
        self._base_dir = ensure_model(args, config_only=True)  # uploads are checked against it
        self._base_fingerprint = load_base_model(self._base_dir)[1]["fingerprint"]
        self._upload_limits = args.store_limits(self._base_dir)
        self.max_body_bytes = args.max_request_body_bytes or default_max_body_bytes(args.max_model_len)
        self.api_docs = args.api_docs if args.api_docs is not None else args.api_keys is None
        self._metrics = IngressMetrics()
        self._loop_lag = LoopLag("ingress", self._metrics.loop_lag.observe)
        self._page = MetricsPage(self._engine_snapshots, args.model_name(), node_metrics_url()) \
            if args.metrics_endpoint else None
        who = ("API keys from " + args.api_keys + " (Authorization: Bearer <key>)" if args.api_keys
               else f"development mode: the {TENANT_HEADER} header names the tenant")
        logger.info("moeplex ingress ready: model %r; %s; adapter store %s; adapters up to "
                    "rank %d and %d bytes; metrics %son Ray's metrics export port (`ray start "
                    "--metrics-export-port`)", args.model_name(), who, args.store_uri(),
                    args.max_lora_rank, self._upload_limits.max_adapter_bytes,
                    "at GET /metrics and " if args.metrics_endpoint else "")
        if in_actor:  # the replica's heap of Ray, FastAPI and ours, out of the collector's walks
            freeze_startup_heap()

    def count_request(self, headers, route: str, status: int) -> None:
        """moeplex_requests, for every answer of a model route (http_guards.RequestCounter): the
        tenant the headers name, "-" where they name none this ingress accepts."""
        try:
            tenant = self._auth.tenant_of(headers)
        except APIError:
            tenant = "-"
        self._metrics.request(tenant, route, status)

    # ---- health -------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> dict:
        """200 while an engine replica answers (its stats), or while autoscaling has none running
        with min_replicas 0 (engine "scaled_to_zero": a request starts one; this probe never
        does); else 503 not_ready, within READY_TIMEOUT_S."""
        try:
            info = await self._engine_ready()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            raise ServiceUnavailableError(f"no model replica answered: {type(exc).__name__}",
                                          code="not_ready") from exc
        return {"status": "ready", "model": self._args.model_name(),
                "engine": SCALED_TO_ZERO if info is None else info["stats"]}

    async def _engine_ready(self) -> dict | None:
        """An engine replica's ready answer (None: scaled to zero), asked at most once every
        READY_ANSWER_S by this ingress replica however often /ready is hit (it needs no key, so
        a flood of it must not reach the engine replicas): callers in between share the last
        answer or the call in flight; a failed call is not kept."""
        answer = self._ready_answer
        if answer is not None and self._clock() - answer[0] < READY_ANSWER_S:
            return answer[1]
        if self._ready_call is None or self._ready_call.done():
            self._ready_call = asyncio.ensure_future(
                asyncio.wait_for(self._ask_ready(), timeout=READY_TIMEOUT_S))
        info = await asyncio.shield(self._ready_call)
        self._ready_answer = (self._clock(), info)
        return info

    async def _ask_ready(self) -> dict | None:
        """A ready() among the running engine replicas (Serve's broadcast, which waits for all of
        them): a dead one is passed over rather than 503 while it is replaced (a hung one holds the
        answer until READY_TIMEOUT_S); and a call routed to one would be load, which where
        autoscaling may stop every replica would start one, and keep one running, for each probe."""
        from ray.serve.exceptions import DeploymentUnavailableError
        try:
            answers = await self._llm.broadcast("ready").results_async(return_exceptions=True)
        except DeploymentUnavailableError:  # Serve's answer where none is running
            if self._args.scales_to_zero():
                return None
            raise
        for answer in answers:
            if not isinstance(answer, BaseException):
                return answer
        raise answers[0] if answers else RuntimeError("no engine replica answered")

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        """Prometheus text: vLLM's scheduler series summed over the engine replicas, for the
        Gateway API Inference Extension, and this node's ray_moeplex_* (deployments/metrics.py).
        No tenant auth, as vLLM's; 404 with metrics_endpoint=false."""
        if self._page is None:
            raise StarletteHTTPException(status_code=404)
        return PlainTextResponse(await self._page.text(), media_type=EXPOSITION_CONTENT_TYPE)

    async def _engine_snapshots(self) -> list:
        """Every engine replica's `metrics_snapshot()`, an exception in place of one that failed."""
        return await self._llm.broadcast("metrics_snapshot").results_async(return_exceptions=True)

    # ---- models and adapters ------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request, response: Response) -> dict:
        """The base model and the adapters the caller may use; in development mode a caller
        that names no tenant gets the base model and the shared adapters. While the store is
        unreachable, the caller's last list (LastListings) with the header STALE_LIST_HEADER."""
        no_tenant = self._auth.dev_mode and not request.headers.get(TENANT_HEADER)
        tenant = _ANY_TENANT if no_tenant else self._auth.tenant_of(request.headers)
        adapters, stale = await self._listings.list(tenant)
        if stale:
            response.headers[STALE_LIST_HEADER] = "adapter store unreachable; adapters as last listed"
        # ids first, over every adapter the store resolves names among; then what is not listed
        listed = [(model_id, a) for model_id, a in self._listed_ids(adapters, tenant)
                  if self._fits_base(a) and (a.shared or not no_tenant)]
        cards = [self._base_card()] + [self._adapter_card(model_id, a) for model_id, a in listed]
        return {"object": "list", "data": [c.model_dump() for c in cards]}

    def _listed_ids(self, adapters: list, tenant: str) -> list[tuple[str, object]]:
        """Each adapter of the store's list for `tenant` with the `model` that reaches it, by the
        store's own rule (AdapterStore.resolve): a plain name reaches the tenant's own adapter of
        that name, else the one sharer of it; any other is 'owner/name'. An id that is the base
        model's name is '<base>:<id>' (the store's CLI does not know the served name)."""
        base = self._args.model_name()
        own = {a.name for a in adapters if a.tenant == tenant}
        sharers = Counter(a.name for a in adapters if a.tenant != tenant)
        out = []
        for a in adapters:
            plain = a.tenant == tenant or (a.name not in own and sharers[a.name] == 1)
            model_id = a.name if plain else f"{a.tenant}/{a.name}"
            out.append((f"{base}:{model_id}" if model_id == base else model_id, a))
        return out

    def _fits_base(self, info) -> bool:
        """Whether the adapter was validated against a checkpoint of the served model's shapes (an
        adapter stored without the record, by an older store, is taken to fit)."""
        return _made_for(info).get("fingerprint", self._base_fingerprint) == self._base_fingerprint

    def _other_base(self, model: str, info) -> UnprocessableError:
        made_for = _made_for(info)
        # the checkpoint's last name only: the uploader's path is not another tenant's business
        name = Path(str(made_for.get("name") or "unnamed")).name
        return UnprocessableError(
            f"adapter {model!r} was made for another base model ({name}, "
            f"{made_for.get('model_type', 'of another family')}) than the one served here "
            f"({self._args.model_name()!r}); upload a version trained on this one",
            code="adapter_base_mismatch", param="model")

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> dict:
        """OpenAI's retrieve (the SDK's models.retrieve): the card of a `model` as a request names
        it (the base model, an adapter's name, name@version or '<base>:<adapter>')."""
        tenant = None if self._auth.dev_mode and not request.headers.get(TENANT_HEADER) else (
            self._auth.tenant_of(request.headers))
        ref = self._adapter_ref(model)
        if ref is None:
            return self._base_card().model_dump()
        try:
            info = await self._resolved.resolve(tenant or _ANY_TENANT, ref)
        except (AdapterNotFoundError, InvalidNameError) as exc:
            raise self._unknown_model(model) from exc
        if tenant is None and not info.shared:  # no tenant named: the shared adapters only, as in the list
            raise self._unknown_model(model)
        if not self._fits_base(info):
            raise self._other_base(model, info)
        return self._adapter_card(model, info).model_dump()

    def _base_card(self) -> ModelCard:
        return ModelCard(id=self._args.model_name(), owned_by="moeplex", created=self._started,
                         max_model_len=self._args.max_model_len)

    def _adapter_card(self, model: str, info) -> ModelCard:
        return ModelCard(id=model, owned_by=info.tenant, root=f"{info.name}@{info.version}",
                         parent=self._args.model_name(), max_model_len=self._args.max_model_len,
                         created=int(info.manifest.get("created_unix", self._started)))

    @staticmethod
    def _unknown_model(model: str) -> NotFoundError:
        return NotFoundError(f"model {model!r} does not exist or is not available to you; GET "
                             "/v1/models lists the base model and your adapters",
                             code="model_not_found", param="model")

    # ---- tokenizer ----------------------------------------------------------------
    @api.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest, request: Request) -> dict:
        """vLLM's: the ids a prompt or a conversation gives the model, as the completion routes
        would (schemas.TokenizeRequest), counted with the tenant's requests in flight."""
        tenant = self._auth.tenant_of(request.headers)
        try:
            payload = body.payload()
        except ValueError as exc:  # as on chats: a content part that is not text
            raise BadRequestError(str(exc), code="unsupported_content", param="messages") from exc
        return await self._tokenizer_call("tokenize", tenant, body.model, payload)

    @api.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> dict:
        """vLLM's: the text token ids decode to."""
        tenant = self._auth.tenant_of(request.headers)
        return await self._tokenizer_call("detokenize", tenant, body.model, {"tokens": body.tokens})

    async def _tokenizer_call(self, method: str, tenant: str, model: str | None, payload: dict) -> dict:
        with self._limiter.held(tenant):
            if model is not None:  # a model the caller may not use is a 404, as on completions
                await self._multiplexed_id(tenant, model)
            payload.update(request_id=f"{method[:3]}-{uuid.uuid4().hex}", tenant=tenant)
            try:  # any engine replica: the adapters share the base model's tokenizer
                answer = await getattr(self._llm, method).remote(payload)
            except Exception as exc:  # noqa: BLE001 - Ray errors (actor died, unavailable)
                raise lost_replica(exc) from exc
            if "error" in answer:
                raise error_from_item(answer["error"])
            return answer

    # ---- completions --------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        payload = {"prompt": body.prompts()[0], "max_tokens": body.max_tokens,
                   "add_special_tokens": body.add_special_tokens}
        if body.echo:
            payload["echo"] = True
        return await self._complete(request, self._auth.tenant_of(request.headers), body, payload, COMPLETION)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        # before the messages are looked at: a caller without credentials hears so first
        tenant = self._auth.tenant_of(request.headers)
        try:
            messages = [m.for_template() for m in body.messages]
        except ValueError as exc:
            raise BadRequestError(str(exc), code="unsupported_content", param="messages") from exc
        payload = {"messages": messages, "max_tokens": body.token_budget(),
                   "template_options": body.template_options(), "add_special_tokens": body.add_special_tokens}
        if body.chat_template_kwargs:  # a template that fails on them blames them
            payload["template_variables"] = True
        if body.tool_plan() is not None:  # the chat template renders them (deployments/tool_calls.py)
            payload["tools"] = body.tool_plan().tools
        return await self._complete(request, tenant, body, payload, CHAT)

    async def _complete(self, request: Request, tenant: str, body, payload: dict, kind: str):
        arrived = time.perf_counter()
        n = body.n
        # a completion's batch of prompts: n choices each, choice j of prompt i numbered i * n + j
        prompts = body.prompts() if kind == COMPLETION else [None]
        self._loop_lag.ensure_started()
        if (total := n * len(prompts)) > (limit := self._limiter.limit(tenant)):  # could never run: not 429
            k = self._limiter.num_replicas
            shared = f", the tenant's limit shared out over {k} ingress replicas" if k > 1 else ""
            asked = f"n={n} choices" if len(prompts) == 1 else f"{len(prompts)} prompts x n={n} choices"
            raise BadRequestError(
                f"{asked} are more than tenant {tenant!r} may have in flight here ({limit}{shared}); "
                f"ask for at most {limit}, or ask the operator for a higher {self._limiter.setting_of(tenant)}",
                code="too_many_choices", param="n" if len(prompts) == 1 else "prompt")
        self._limiter.acquire(tenant, total)
        try:
            model_id = await self._multiplexed_id(tenant, body.model)
            resolved = time.perf_counter()
            if model_id and self._hot.is_hot(model_id, total):  # balanced by load, not pinned to one replica
                payload["adapter"], model_id = model_id, ""
            if getattr(body, "max_completion_tokens", None) is not None:  # a refusal names it
                payload["max_tokens_field"] = "max_completion_tokens"
            self._check_budget(payload["max_tokens"], payload.get("max_tokens_field", "max_tokens"))
            rid = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
            payload.update(request_id=rid, tenant=tenant, sampling=body.sampling())
            if body.structured_field() is not None:  # the 400 of a constraint that does not compile names it
                payload["structured_field"] = body.structured_field()
            if body.truncate_prompt_tokens is not None:
                payload["truncate_prompt_tokens"] = body.truncate_prompt_tokens
            logger.info("request %s tenant %s model %s stream=%s%s%s", rid, tenant,
                        model_id or payload.get("adapter", "base"), body.stream, f" n={n}" if n > 1 else "",
                        f" prompts={len(prompts)}" if len(prompts) > 1 else "")
            replicas = self._llm.options(stream=True, multiplexed_model_id=model_id)
            if total == 1:
                items = replicas.generate.remote(payload)
                first = await first_item(items, rid)
            else:  # a stream a choice (choices.py); the timing is of all their first tokens
                streams = [replicas.generate.remote(p) for p in choice_payloads(payload, n, prompts)]
                firsts = await first_items(streams, rid)
                first = firsts[0]
            timing = ServerTiming(arrived, resolved, first) if self._args.server_timing else None
        except BaseException:
            self._limiter.release(tenant, total)
            raise
        usage, tools = body.stream_usage(), body.tool_plan()
        if total == 1:
            builder, streams = ResponseBuilder(kind, rid, body.model, body.return_token_ids, tools=tools), [items]

            def lines(end: StreamEnd):
                return sse_events(builder, self._released(end, rid, first, items), usage)

            def whole():
                return collect(builder, first, items)
        else:  # choices.py
            created = int(time.time())
            builders = [ResponseBuilder(kind, rid, body.model, body.return_token_ids, index=i, created=created,
                                        tools=tools) for i in range(total)]

            def lines(end: StreamEnd):
                return self._released_lines(end, merged_events(builders, firsts, streams, usage, n))

            def whole():
                return collect_choices(builders, firsts, streams, n)
        return await self._respond(body.stream, tenant, streams, timing, lines, whole)

    async def _respond(self, stream: bool, tenant: str, streams: list, timing: ServerTiming | None, lines, whole):
        """The response over the request's replica streams (one a choice): `lines(end)`, its SSE
        body, when streaming, else `whole()`'s; either way the tenant's places come back at its end."""
        n = len(streams)
        if stream:
            end = StreamEnd(lambda: self._limiter.release(tenant, n), streams)
            return EndingStreamingResponse(lines(end), end, media_type="text/event-stream",
                                           headers=timing.headers() if timing else None)
        try:
            response = await whole()
            if timing:
                response.headers.update(timing.headers(total=True))
            return response
        finally:
            self._limiter.release(tenant, n)

    @staticmethod
    async def _released_lines(end: StreamEnd, lines):
        """`lines` (an SSE stream of n choices); frees the tenant's n places at its end, a client
        that left included (closing `lines` cancels the choices still decoding)."""
        try:
            async for line in lines:
                yield line
        finally:
            await lines.aclose()
            end.close(cancel=False)

    @staticmethod
    async def _released(end: StreamEnd, rid: str, first: dict, items):
        """The replica items (first one included); frees the tenant's place at the end.

        A client that leaves mid-stream ends this generator early (Starlette stops iterating
        on the disconnect); the replica's request is then cancelled here, since that normal
        return of the HTTP handler would not cancel it, and the engine would decode on.
        """
        item = first
        try:
            yield first
            async for item in items:
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            if item.get("finish_reason") is None and "error" not in item:
                logger.info("request %s: the client left, cancelling it", rid)
                items.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the replica died mid-stream
            logger.warning("request %s stream broke: %s", rid, type(exc).__name__)
            yield {"error": lost_replica(exc).body()["error"]}
        finally:
            end.close(cancel=False)

    async def _multiplexed_id(self, tenant: str, model: str) -> str:
        ref = self._adapter_ref(model)
        if ref is None:
            return ""
        try:
            info = await self._resolved.resolve(tenant, ref)
        except InvalidNameError as exc:
            raise BadRequestError(f"model {model!r} names neither the served model nor an "
                                  f"adapter: {exc}", code="invalid_model", param="model") from exc
        except AdapterNotFoundError as exc:
            raise self._unknown_model(model) from exc
        if not self._fits_base(info):  # refused here: the replica would fail to load it
            raise self._other_base(model, info)
        return info.ref

    def _adapter_ref(self, model: str) -> str | None:
        """The adapter ref in a request's `model`, None for the base model. vLLM users send the
        adapter's ref alone, Ray Serve LLM and sglang users `<served model>:<ref>`; a ref holds
        no ':', so the last one splits (a served name may hold one, as in "qwen3:30b")."""
        base = self._args.model_name()
        if model == base:
            return None
        prefix, colon, ref = model.rpartition(":")
        if not colon:
            return model
        if prefix != base:
            raise NotFoundError(
                f"model {prefix!r} is not served here; this server serves {base!r}: send "
                f"model={base!r}, an adapter's name, or '{base}:<adapter>'",
                code="model_not_found", param="model")
        return ref

    def _check_budget(self, max_tokens: int | None, field: str) -> None:
        limit = self._args.max_model_len
        if max_tokens is not None and max_tokens >= limit:
            raise BadRequestError(
                f"{field}={max_tokens} does not fit this model's context of {limit} tokens "
                "(prompt included); ask for fewer tokens", code="max_tokens_too_large",
                param=field)

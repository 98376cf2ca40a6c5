"""The adapter store API over a key/blob backend (`open_store` in `backends` picks one).

Layout (docs/DESIGN.md), keys relative to the store root:

    tenants/{tenant}/adapters/{name}/versions/{version}/adapter_config.json
    tenants/{tenant}/adapters/{name}/versions/{version}/adapter_model.safetensors
    tenants/{tenant}/adapters/{name}/versions/{version}/manifest.json   <- written last
    shared/{tenant}/{name}                                               <- operator's share mark

A version without manifest.json does not exist for readers. Version names sort by
creation time (UTC, microseconds) and end in a random suffix, so concurrent uploads
of one name get distinct versions. Other tenants name a shared adapter `owner/name`;
a plain `name` means the caller's own adapter, else the one shared adapter of that name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from adapter_store.errors import (
    AdapterNotFoundError, AdapterStoreError, ChecksumMismatchError, LimitExceededError, StoreUnavailableError,
)
from adapter_store.garbage import MANIFEST_FILE, collect_garbage
from adapter_store.names import check_name, is_name, parse_pinned_ref, parse_ref
from adapter_store.validate import ADAPTER_FILES, StoreLimits, validate_adapter
from adapter_store.versions import (AdapterInfo, Progress, adapter_key, file_digest, new_version,
                                    version_key)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


class AdapterStore(ABC):
    """Tenant adapters over a backend; subclasses implement the underscore blob methods."""

    uri: str

    # -- backend primitives (keys are '/'-joined, relative to the store root) --
    @abstractmethod
    def _read(self, key: str) -> bytes | None: ...
    @abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...
    @abstractmethod
    def _upload_file(self, key: str, path: Path, progress: Progress) -> None: ...
    @abstractmethod
    def _download_file(self, key: str, dest: Path, size: int, progress: Progress) -> None: ...
    @abstractmethod
    def _list_children(self, prefix: str) -> list[str]: ...
    @abstractmethod
    def _delete(self, key: str) -> None: ...
    @abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...
    @abstractmethod
    def _list_objects(self, prefix: str) -> list[tuple[str, float]]:
        """Every object under `prefix`, recursively: (key, last modified as unix time)."""

    def _list_keys(self, prefix: str) -> list[str]:
        """The keys of `_list_objects(prefix)`; backends where the times cost extra override it."""
        return [key for key, _ in self._list_objects(prefix)]

    @contextlib.contextmanager
    def _commit_lock(self, tenant: str) -> Iterator[None]:
        """Held around "count the tenant's adapters, then write a manifest"; no lock by default."""
        yield

    # -- writes --
    def put(self, tenant: str, name: str, src_dir: str | Path, base_model_dir: str | Path,
            limits: StoreLimits = StoreLimits(), progress: Progress = None) -> AdapterInfo:
        """Validate `src_dir` against the base model, then store it as a new version.

        At most `max_versions_per_adapter` versions of a name are kept (StoreLimits, default
        DEFAULT_MAX_VERSIONS_PER_ADAPTER): once the new manifest is written, the oldest
        versions beyond that are deleted. The store prunes rather than refusing with a 429
        because uploading a retrained adapter under the same name is the normal workflow: a
        refusal would make every such tenant delete versions by hand, and a bare `name` always
        serves the newest version, which pruning never touches. The price: a pinned
        `name@version` reference to a pruned version gets 404, like any deleted version.
        """
        check_name(tenant, "tenant name")
        check_name(name)
        summary = validate_adapter(src_dir, base_model_dir, limits)
        self._check_count(tenant, name, limits)
        version, src = new_version(), Path(src_dir)
        files = {f: file_digest(src / f) for f in ADAPTER_FILES}
        prefix = version_key(tenant, name, version)
        try:
            for filename in ADAPTER_FILES:
                self._upload_file(f"{prefix}/{filename}", src / filename, progress)
            manifest = self._manifest(tenant, name, version, files, summary)
            with self._commit_lock(tenant):  # another upload may have taken the last free place
                live_before = self._check_count(tenant, name, limits)
                self._write_bytes(f"{prefix}/{MANIFEST_FILE}", json.dumps(manifest, indent=1).encode())
            self._check_committed(prefix)
            if name not in live_before:
                self._check_admitted(tenant, prefix, limits)
        except BaseException:
            self._cleanup_quietly(prefix)
            raise
        with self._commit_lock(tenant):  # two uploads of a name never delete the same files at once
            self._prune_versions(tenant, name, limits.max_versions_per_adapter, committed=version)
        return AdapterInfo(tenant, name, version, manifest, self._is_shared(tenant, name))

    def delete(self, tenant: str, name: str, version: str | None = None) -> None:
        """Delete one version, or the whole adapter with every version and its share mark."""
        check_name(tenant, "tenant name")
        check_name(name)
        # by the manifests' presence, not their content: a corrupt one must not block its own removal
        if version is not None:
            if check_name(version, "version") not in self._visible_versions(tenant, name):
                raise self._not_found(f"{name}@{version}")
            prefix = version_key(tenant, name, version)
            self._delete(f"{prefix}/{MANIFEST_FILE}")  # invisible first, then the files
            self._delete_prefix(prefix)
            if not self._visible_versions(tenant, name):  # a later upload of the name starts unshared
                self._delete(f"shared/{tenant}/{name}")
            return
        versions = self._visible_versions(tenant, name)
        if not versions:
            raise self._not_found(name)
        self._delete(f"shared/{tenant}/{name}")
        for version in versions:
            self._delete(f"{version_key(tenant, name, version)}/{MANIFEST_FILE}")
        # the versions listed only: an upload in flight keeps its files and commits a version
        # after this delete (as if it began after it); a crashed one's are `gc`'s
        for version in versions:
            self._delete_prefix(version_key(tenant, name, version))

    def share(self, tenant: str, name: str, shared: bool = True) -> None:
        """Operator action: let every tenant see and use `tenant`'s adapter `name`."""
        self._resolve_own(check_name(tenant, "tenant name"), check_name(name), None)
        if shared:
            mark = {"shared_at": datetime.now(timezone.utc).isoformat()}
            self._write_bytes(f"shared/{tenant}/{name}", json.dumps(mark).encode())
        else:
            self._delete(f"shared/{tenant}/{name}")

    def collect_garbage(self, older_than_s: float = 3600, now: float | None = None,
                        dry_run: bool = False) -> list[str]:
        """Delete the files of crashed uploads (no manifest, every object older than
        `older_than_s` at `now`, default the current time); return their version prefixes."""
        return collect_garbage(self, older_than_s, now, dry_run)

    # -- reads --
    def resolve(self, tenant: str, ref: str) -> AdapterInfo:
        """`name`, `name@version`, `owner/name[@version]` -> the visible version it means."""
        check_name(tenant, "tenant name")
        parsed = parse_ref(ref)
        if parsed.owner in (None, tenant):
            try:
                return self._resolve_own(tenant, parsed.name, parsed.version)
            except AdapterNotFoundError:
                if parsed.owner == tenant:
                    raise
        owner = parsed.owner or self._unique_sharer(tenant, parsed.name)
        if not self._is_shared(owner, parsed.name):
            raise self._not_found(ref)
        info = self._resolve_own(owner, parsed.name, parsed.version)
        return AdapterInfo(info.tenant, info.name, info.version, info.manifest, True)

    def read_pinned(self, ref: str) -> AdapterInfo:
        """The version an `owner/name@version` names (what `AdapterInfo.ref` gives), read
        directly: no visibility rule or latest-version lookup, since whoever pinned it (the
        ingress, for a tenant allowed to use it) already applied them."""
        parsed = parse_pinned_ref(ref)
        info = self._read_version(parsed.owner, parsed.name, parsed.version,
                                  self._is_shared(parsed.owner, parsed.name))
        if info is None:
            raise self._not_found(ref)
        return info

    def list_versions(self, tenant: str, name: str) -> list[AdapterInfo]:
        """Visible versions of the caller's adapter (or a shared `owner/name`), oldest first."""
        check_name(tenant, "tenant name")
        parsed = parse_ref(name)
        owner = parsed.owner or tenant
        if owner != tenant and not self._is_shared(owner, parsed.name):
            return []
        shared = self._is_shared(owner, parsed.name)
        versions = self._list_children(f"{adapter_key(owner, parsed.name)}/versions")
        infos = (self._read_version(owner, parsed.name, v, shared) for v in sorted(versions))
        return [i for i in infos if i is not None]

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        """The latest version of each of the tenant's adapters, then the shared ones of others.

        Two recursive listings (the tenant's adapters, the share marks), one more per adapter
        another tenant shares, and one manifest read per adapter, the reads concurrent where the
        backend allows (`_read_many`): a walk per adapter cost ~3 sequential requests each,
        seconds for a tenant with hundreds on S3."""
        check_name(tenant, "tenant name")
        marks = self._shared_marks()
        own = {name for owner, name in marks if owner == tenant}
        found = self._latest_of(tenant, self._manifested_under(tenant), own)
        for owner, name in marks:
            if owner != tenant:
                found += self._latest_of(owner, self._manifested_under(owner, name), {name})
        return found

    def download(self, info: AdapterInfo, filename: str, dest: Path, progress: Progress = None) -> None:
        """Copy one file of a version to `dest` (no verification: DiskCache verifies)."""
        if filename not in ADAPTER_FILES:
            raise ValueError(f"{filename!r} is not an adapter file; expected one of {ADAPTER_FILES}")
        size = info.manifest["files"][filename]["size"]
        key = f"{version_key(info.tenant, info.name, info.version)}/{filename}"
        self._download_file(key, Path(dest), size, progress)

    # -- helpers --
    def _resolve_own(self, owner: str, name: str, version: str | None) -> AdapterInfo:
        shared = self._is_shared(owner, name)
        if version is not None:
            info = self._read_version(owner, name, version, shared)
        else:
            info = next(iter(self._latest(owner, name, shared)), None)
        if info is None:
            raise self._not_found(name if version is None else f"{name}@{version}")
        return info

    def _visible_versions(self, owner: str, name: str) -> list[str]:
        """The versions of `name` that have a manifest, oldest first, its content unread (a
        corrupt one counts)."""
        return sorted(self._manifested_under(owner, name).get(name, []))

    def _latest(self, owner: str, name: str, shared: bool | None = None) -> list[AdapterInfo]:
        shared = self._is_shared(owner, name) if shared is None else shared
        for version in sorted(self._list_children(f"{adapter_key(owner, name)}/versions"), reverse=True):
            info = self._read_version(owner, name, version, shared)
            if info is not None:
                return [info]
        return []

    def _manifested_under(self, owner: str, name: str | None = None) -> dict[str, list[str]]:
        """Adapter name -> its versions that have a manifest, newest first, from one recursive
        listing of `owner`'s adapters (or of its adapter `name` only)."""
        prefix = adapter_key(owner, name) if name else f"tenants/{owner}/adapters"
        versions: dict[str, list[str]] = {}
        for key in self._list_keys(prefix):
            parts = key[len(prefix) + 1:].split("/")
            if name:
                parts = [name, *parts]
            if (len(parts) == 4 and parts[1] == "versions" and parts[3] == MANIFEST_FILE
                    and is_name(parts[0]) and is_name(parts[2])):
                versions.setdefault(parts[0], []).append(parts[2])
        return {n: sorted(vs, reverse=True) for n, vs in sorted(versions.items())}

    def _latest_of(self, owner: str, manifested: dict[str, list[str]], shared: set[str]) -> list[AdapterInfo]:
        """The newest version of each adapter in `manifested`, by name; one whose newest manifest
        went away since the listing (a delete or a prune) is looked up again on its own."""
        names = list(manifested)
        raws = self._read_many([f"{version_key(owner, n, manifested[n][0])}/{MANIFEST_FILE}" for n in names])
        found = []
        for name, raw in zip(names, raws):
            if raw is None:
                found += self._latest(owner, name, name in shared)
            else:
                found.append(self._parse_version(owner, name, manifested[name][0], name in shared, raw))
        return found

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        """`_read` of each key, in order; backends with concurrent requests override it."""
        return [self._read(key) for key in keys]

    def _read_version(self, owner: str, name: str, version: str, shared: bool) -> AdapterInfo | None:
        raw = self._read(f"{version_key(owner, name, version)}/{MANIFEST_FILE}")
        return None if raw is None else self._parse_version(owner, name, version, shared, raw)

    def _parse_version(self, owner: str, name: str, version: str, shared: bool, raw: bytes) -> AdapterInfo:
        key = f"{version_key(owner, name, version)}/{MANIFEST_FILE}"
        try:
            manifest = json.loads(raw)
            manifest["files"][ADAPTER_FILES[-1]]["sha256"]
        except (ValueError, KeyError, TypeError):
            raise ChecksumMismatchError(f"manifest {key} in {self.uri} is corrupt; delete this version "
                                        "and upload the adapter again", code="corrupt_manifest") from None
        return AdapterInfo(owner, name, version, manifest, shared)

    def _is_shared(self, owner: str, name: str) -> bool:
        return self._read(f"shared/{owner}/{name}") is not None

    def _shared_marks(self) -> list[tuple[str, str]]:
        """(owner, name) of every share mark, sorted; one recursive listing."""
        marks = set()
        for key in self._list_keys("shared"):
            parts = key.split("/")
            if len(parts) == 3 and is_name(parts[1]) and is_name(parts[2]):
                marks.add((parts[1], parts[2]))
        return sorted(marks)

    def _unique_sharer(self, tenant: str, name: str) -> str:
        owners = [o for o, n in self._shared_marks() if n == name and o != tenant]
        if len(owners) > 1:
            raise AdapterNotFoundError(f"several shared adapters are named {name!r} (owners: "
                                       f"{', '.join(owners)}); name one as 'owner/{name}'")
        if not owners:
            raise self._not_found(name)
        return owners[0]

    def _check_count(self, tenant: str, name: str, limits: StoreLimits) -> set[str]:
        """Raise where a new name would go over the tenant's limit; return the live names.

        Names count once they have a visible version: an upload in flight (ours included) or
        the leftovers of a crashed one neither take a place nor grant one."""
        live = set(self._manifested_under(tenant))
        if name not in live and len(live) >= limits.max_adapters_per_tenant:
            raise self._too_many(tenant, len(live))
        return live

    def _check_admitted(self, tenant: str, prefix: str, limits: StoreLimits) -> None:
        """After the manifest of a new name is written: where the tenant's live names are over
        the limit (uploads of other new names committed meanwhile: no lock spans processes on
        S3), this upload takes its manifest back and fails. Whichever upload lists last sees
        every manifest kept before it, so the tenant is never left over its limit; racers that
        list while all their manifests stand may all fail (no order they all see alike exists:
        a version named first may be written last)."""
        if len(self._manifested_under(tenant)) > limits.max_adapters_per_tenant:
            self._delete(f"{prefix}/{MANIFEST_FILE}")
            raise self._too_many(tenant, limits.max_adapters_per_tenant)

    @staticmethod
    def _too_many(tenant: str, count: int) -> LimitExceededError:
        return LimitExceededError(f"tenant {tenant!r} already has {count} adapters, the limit; delete one "
                                  "(DELETE /v1/adapters/NAME, or moeplex-adapters delete) before adding another",
                                  code="too_many_adapters")

    def _manifest(self, tenant, name, version, files, summary) -> dict:
        now = time.time()
        created = datetime.fromtimestamp(now, timezone.utc).isoformat()
        return {"format": MANIFEST_FORMAT, "tenant": tenant, "name": name, "version": version,
                "created": created, "created_unix": now, "files": files, "rank": summary.rank,
                "targets": summary.targets, "layout": summary.layout, "dtypes": summary.dtypes,
                "num_tensors": summary.num_tensors, "base_model": summary.base_model}

    def _check_committed(self, prefix: str) -> None:
        """Raise, after its manifest is written, where a version's files are not all there (a
        `gc` with an age shorter than the upload took them): a manifest never names missing files."""
        present = {key.rsplit("/", 1)[-1] for key in self._list_keys(prefix)}
        missing = [f for f in ADAPTER_FILES if f not in present]
        if missing:
            self._delete(f"{prefix}/{MANIFEST_FILE}")
            raise StoreUnavailableError(f"{', '.join(missing)} of the new version vanished while it was "
                                        "stored (a `gc` younger than the upload?); upload it again",
                                        code="upload_interrupted")

    def _prune_versions(self, tenant: str, name: str, keep: int, committed: str | None = None) -> None:
        """Delete the visible versions of `name` older than its newest `keep`, each manifest first,
        never `committed` (the version an upload just stored and reports: another upload, or a
        clock behind the others', may have named a newer one).

        The new version is committed by now, so a failure is logged rather than raised: the
        upload did succeed. The next upload of the name prunes the versions still visible; the
        files of one whose manifest is already gone are a leftover that `gc` removes."""
        try:
            for info in [v for v in self.list_versions(tenant, name)[:-keep] if v.version != committed]:
                old = version_key(tenant, name, info.version)
                self._delete(f"{old}/{MANIFEST_FILE}")  # invisible first, then the files
                self._delete_prefix(old)
        except (AdapterStoreError, OSError) as exc:
            logger.warning("could not delete old versions of %s/%s beyond the newest %d: %s",
                           tenant, name, keep, exc)

    def _cleanup_quietly(self, prefix: str) -> None:
        try:
            self._delete_prefix(prefix)
        except Exception:  # the version has no manifest: invisible whether or not this works
            pass

    @staticmethod
    def _not_found(ref: str) -> AdapterNotFoundError:
        return AdapterNotFoundError(f"adapter {ref!r} not found; list yours and the shared ones with "
                                    "`moeplex-adapters list --tenant TENANT`")

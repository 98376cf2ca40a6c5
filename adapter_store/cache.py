"""Node-local disk cache of adapter files, shared by every process on the node.

    {cache_dir}/entries/{key}/adapter_config.json, adapter_model.safetensors
    {cache_dir}/locks/{key}.lock      one download per key across processes
    {cache_dir}/tmp/                  downloads in flight, renamed into entries/ when verified

`key` is the sha256 of the files' own sha256s, so identical adapters uploaded under
two names share one entry (content-addressed). An entry appears by an atomic rename
of a fully downloaded and verified directory; a hit touches the entry's mtime, and
eviction removes the least recently used entries until the cache fits `max_bytes`.
A hit costs no request to the store. A fetch's hit also checks each file's size against the
manifest (a stat; a file cut short by a full disk or a crash is fetched again, where its
sha256 is checked); `discard` drops an entry whose reader found it unreadable.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from adapter_store.errors import ChecksumMismatchError
from adapter_store.store import AdapterStore
from adapter_store.versions import AdapterInfo, Progress
from adapter_store.validate import ADAPTER_FILES

_STALE_TMP_SECONDS = 3600


class DiskCache:
    """Fetch adapter versions from a store into `cache_dir`, bounded by `max_bytes`."""

    def __init__(self, cache_dir: str | Path, max_bytes: int, lock_timeout: float = 600.0):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"DiskCache max_bytes must be a positive int, got {max_bytes!r}")
        self.root = Path(cache_dir).expanduser().absolute()
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout
        self.hits = 0
        self.downloads = 0
        for sub in ("entries", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def fetch(self, store: AdapterStore, info: AdapterInfo, progress: Progress = None) -> Path:
        """Directory holding the version's adapter_config.json and adapter_model.safetensors."""
        key = entry_key(info.manifest)
        entry = self.root / "entries" / key
        if self._hit(entry) and _sizes_match(entry, info.manifest):
            return entry
        with FileLock(str(self.root / "locks" / f"{key}.lock"), timeout=self.lock_timeout):
            if self._hit(entry):  # another process downloaded it while we waited, or it is damaged
                if _sizes_match(entry, info.manifest):
                    return entry
                self._drop(entry)
            self._download(store, info, entry, progress)
            self.downloads += 1
        self.evict(keep=key)
        return entry

    def contains(self, info: AdapterInfo) -> bool:
        return (self.root / "entries" / entry_key(info.manifest)).is_dir()

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries (never `keep`, never one being written)."""
        with FileLock(str(self.root / "evict.lock"), timeout=self.lock_timeout):
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path.name != keep and self._remove_entry(path):
                    total -= size
            self._sweep_stale_tmp()

    def discard(self, entry: Path, files: tuple | None = None) -> None:
        """Drop `entry` (a directory fetch returned) whose files could not be read, so the next
        fetch downloads and verifies them again. `files`: the files_signature of those that could
        not be read; an entry fetched again since (by another process of the node) is kept."""
        if entry.parent == self.root / "entries":
            with FileLock(str(self.root / "locks" / f"{entry.name}.lock"), timeout=self.lock_timeout):
                if files is None or files_signature(entry) == files:
                    self._drop(entry)

    def still_holds(self, entry: Path) -> bool:
        """Whether `entry` (a directory fetch returned) is still cached; marks it recently used."""
        return entry.parent == self.root / "entries" and self._hit(entry)

    def _hit(self, entry: Path) -> bool:
        if not entry.is_dir():
            return False
        try:
            os.utime(entry)  # LRU order is the entries' mtime
        except FileNotFoundError:  # evicted between the check and the touch
            return False
        self.hits += 1
        return True

    def _download(self, store: AdapterStore, info: AdapterInfo, entry: Path, progress: Progress) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}-", dir=self.root / "tmp"))
        try:
            for filename in ADAPTER_FILES:
                store.download(info, filename, tmp / filename, progress)
                _verify(tmp / filename, info.manifest["files"][filename], info, filename)
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for path in (self.root / "entries").iterdir():
            try:
                size = sum(f.stat().st_size for f in path.iterdir())
                found.append((path.stat().st_mtime, size, path))
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        return found

    def _remove_entry(self, path: Path) -> bool:
        lock = FileLock(str(self.root / "locks" / f"{path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            return self._drop(path)
        finally:
            lock.release()

    def _drop(self, path: Path) -> bool:
        """Remove an entry, its lock held: renamed out of entries/ at once, then deleted."""
        doomed = self.root / "tmp" / f"evicted-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _sweep_stale_tmp(self) -> None:
        """Remove what crashed processes left in tmp/ (older than an hour)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for path in (self.root / "tmp").iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                continue


def files_signature(path: str | Path | None) -> tuple:
    """What changes when the files in `path` are replaced (each file's name, inode, size and
    status-change time, which no copy preserves and a freed inode's reuse does not repeat; () for
    no directory): a fetch writes new files and renames them into place, so a failure to read the
    old ones says nothing about the new (DiskCache.discard, the engine's loader). The directory's
    own times are left out (a disk-cache hit touches them)."""
    try:
        files = [(f.name, f.stat()) for f in Path(path).iterdir()]
    except (OSError, TypeError):  # TypeError: no path
        return ()
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_ctime_ns) for name, st in files))


def _sizes_match(entry: Path, manifest: dict) -> bool:
    try:
        return all((entry / name).stat().st_size == manifest["files"][name]["size"] for name in ADAPTER_FILES)
    except FileNotFoundError:
        return False


def entry_key(manifest: dict) -> str:
    """Content address of a version: sha256 over its files' sha256s, in file order."""
    digests = "".join(f"{name}:{manifest['files'][name]['sha256']}\n" for name in ADAPTER_FILES)
    return hashlib.sha256(digests.encode()).hexdigest()


def _verify(path: Path, want: dict, info: AdapterInfo, filename: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    size = path.stat().st_size
    if size != want["size"] or digest.hexdigest() != want["sha256"]:
        raise ChecksumMismatchError(
            f"{filename} of {info.ref} does not match its manifest (got {size} bytes, sha256 "
            f"{digest.hexdigest()[:16]}..., expected {want['size']} bytes, {want['sha256'][:16]}...): "
            "the stored object is corrupt; re-upload the adapter", code="checksum_mismatch")

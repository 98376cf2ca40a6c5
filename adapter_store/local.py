"""LocalStore: the adapter store in a local directory (the embedded default).

Every write goes to a hidden temporary file in the target directory and is renamed
into place, so readers see a whole file or none; the manifest is renamed in last.
Uploads of one tenant count its adapters and write their manifest under an flock on
`{root}/.locks/{tenant}.lock`, so the per-tenant limit holds across processes.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from adapter_store.errors import StoreUnavailableError
from adapter_store.store import AdapterStore
from adapter_store.versions import Progress

_TMP_PREFIX = ".tmp-"
_LOCK_DIR = ".locks"
_CHUNK = 4 << 20


class LocalStore(AdapterStore):
    """Adapters under `root_dir` (created if missing)."""

    def __init__(self, root_dir: str | Path, chunk_bytes: int = _CHUNK):
        self.root = Path(root_dir).expanduser().absolute()
        self.uri = str(self.root)
        self.chunk_bytes = chunk_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the store directory {self.root}: {exc}; "
                                        "pick a writable path", code="unreachable") from None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    @contextlib.contextmanager
    def _io(self, action: str, key: str) -> Iterator[None]:
        """A failed write or delete (a full disk, a read-only mount, a file where a directory
        belongs) as the store's typed error: an upload then fails with what to fix, not a 500."""
        try:
            yield
        except OSError as exc:
            raise StoreUnavailableError(f"cannot {action} {self._path(key)}: {exc.strerror or exc}; check "
                                        "the store directory's free space and permissions",
                                        code="io_error") from None

    def _write_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        with self._io("write", key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{_TMP_PREFIX}{secrets.token_hex(6)}-{dest.name}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    def _upload_file(self, key: str, path: Path, progress: Progress) -> None:
        dest = self._path(key)
        with self._io("write", key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{_TMP_PREFIX}{secrets.token_hex(6)}-{dest.name}")
            try:
                _copy(path, tmp, self.chunk_bytes, progress)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    def _download_file(self, key: str, dest: Path, size: int, progress: Progress) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreUnavailableError(f"{src} vanished while being read (deleted concurrently?); retry",
                                        code="unreachable")
        _copy(src, dest, self.chunk_bytes, progress)

    def _list_children(self, prefix: str) -> list[str]:
        try:
            return [p.name for p in self._path(prefix).iterdir() if not p.name.startswith(_TMP_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _list_objects(self, prefix: str) -> list[tuple[str, float]]:
        # Directories count too: their mtime moves whenever an upload adds or renames a file.
        found = []
        for dirpath, dirnames, filenames in os.walk(self._path(prefix)):
            for entry in (dirpath, *(os.path.join(dirpath, f) for f in filenames)):
                try:
                    found.append((Path(entry).relative_to(self.root).as_posix(), os.stat(entry).st_mtime))
                except FileNotFoundError:  # renamed or deleted while we walked
                    continue
        return found

    def _list_keys(self, prefix: str) -> list[str]:
        skip = len(str(self.root)) + 1
        return [f"{dirpath[skip:]}/{f}" for dirpath, _, filenames in os.walk(self._path(prefix)) for f in filenames]

    @contextlib.contextmanager
    def _commit_lock(self, tenant: str) -> Iterator[None]:
        lock_dir = self.root / _LOCK_DIR
        with self._io("lock", f"{_LOCK_DIR}/{tenant}.lock"):
            lock_dir.mkdir(exist_ok=True)
            lock_file = open(lock_dir / f"{tenant}.lock", "a+b")
        with lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _delete(self, key: str) -> None:
        with self._io("delete", key):
            try:
                self._path(key).unlink(missing_ok=True)
            except NotADirectoryError:  # a file where a directory of the key belongs: no such key
                pass

    def _delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            # Rename first so no reader ever walks a half-deleted tree.
            doomed = path.with_name(f"{_TMP_PREFIX}{secrets.token_hex(6)}-{path.name}")
            with self._io("delete", prefix):
                try:
                    os.replace(path, doomed)
                except FileNotFoundError:  # another delete (or gc) took it first
                    return
            shutil.rmtree(doomed, ignore_errors=True)


def _copy(src: Path, dest: Path, chunk_bytes: int, progress: Progress) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(chunk_bytes):
            fout.write(chunk)
            if progress is not None:
                progress(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())

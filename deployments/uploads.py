"""Reading an adapter upload (multipart) into a temporary directory, within limits.

The form carries a field `name` and the files `adapter_config.json` and
`adapter_model.safetensors` in a repeated field `files`, each under its own filename:
`curl -F name=n -F files=@adapter_config.json -F files=@adapter_model.safetensors`.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.requests import Request

from deployments.errors import BadRequestError, PayloadTooLargeError, RequestTimeoutError

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CHUNK = 1 << 20
_FORM_OVERHEAD = 64 << 10  # multipart boundaries and the name field
# A body that sends nothing for this long is given up: its spooled part holds disk and its
# request a place of the tenant's in-flight requests until then.
UPLOAD_IDLE_TIMEOUT_S = 60.0


def check_content_length(request: Request, max_bytes: int) -> None:
    """Refuse a body whose declared size is over the limit before reading any of it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + _FORM_OVERHEAD:
        raise PayloadTooLargeError(
            f"upload of {int(declared)} bytes is over this server's adapter size limit of "
            f"{max_bytes} bytes; train a smaller rank or ask the operator for a higher limit",
            code="adapter_too_large")


async def read_upload(request: Request, max_bytes: int) -> tuple[str, Path]:
    """(adapter name, temp dir holding the two files); the caller removes the dir."""
    check_content_length(request, max_bytes)
    request = _bounded(request, max_bytes + _FORM_OVERHEAD)
    form = await request.form(max_files=len(REQUIRED_FILES) + 1, max_fields=4)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError("the form needs a text field `name` (the adapter's name)",
                                  code="missing_name", param="name")
        uploads = _files_by_name(form.getlist("files"))
        target = Path(tempfile.mkdtemp(prefix="moeplex-upload-"))
        try:
            await _save_within(uploads, target, max_bytes)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return name, target
    finally:
        await form.close()


def _bounded(request: Request, limit: int) -> Request:
    """The request, reading its body only up to `limit` bytes: a chunked body declares no
    size, and the form parser would otherwise spool all of it to disk before we look."""
    received = 0

    async def receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), UPLOAD_IDLE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the upload sent nothing for {UPLOAD_IDLE_TIMEOUT_S:g} s after "
                                      f"{received} bytes; send it again", code="upload_stalled") from None
        received += len(message.get("body", b""))
        if received > limit:
            raise PayloadTooLargeError(
                f"upload is over this server's adapter size limit of {limit - _FORM_OVERHEAD} "
                "bytes; train a smaller rank or ask the operator for a higher limit",
                code="adapter_too_large")
        return message

    return Request(request.scope, receive)


def _files_by_name(parts: list) -> dict[str, UploadFile]:
    files = [p for p in parts if isinstance(p, UploadFile)]
    names = [Path(f.filename or "").name for f in files]
    by_name = dict(zip(names, files))
    unexpected = sorted(set(by_name) - set(REQUIRED_FILES))
    if unexpected:
        raise BadRequestError(
            f"unexpected file(s) {unexpected}: upload exactly {list(REQUIRED_FILES)} in the "
            "`files` field (pickled .bin/.pt weights are refused; convert to safetensors)",
            code="unexpected_file", param="files")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadRequestError(
            f"file(s) {twice} sent more than once: send each of {list(REQUIRED_FILES)} once in the "
            "repeated `files` field", code="duplicate_file", param="files")
    missing = [n for n in REQUIRED_FILES if n not in by_name]
    if missing:
        raise BadRequestError(
            f"missing file(s) {missing}: send each of {list(REQUIRED_FILES)} once in the "
            "repeated `files` field (curl -F files=@adapter_config.json "
            "-F files=@adapter_model.safetensors)", code="missing_file", param="files")
    return by_name


async def _save_within(uploads: dict[str, UploadFile], target: Path, max_bytes: int) -> None:
    total = 0
    for filename, upload in uploads.items():
        with open(target / filename, "wb") as out:
            while chunk := await upload.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLargeError(
                        f"adapter files are over the size limit of {max_bytes} bytes; train a "
                        "smaller rank or ask the operator for a higher limit",
                        code="adapter_too_large")
                out.write(chunk)


def copy_adapter_files(src: Path, max_bytes: int) -> Path:
    """The two adapter files of the server directory `src`, copied into a new temporary
    directory (the caller removes it). Only regular files are read, and at most `max_bytes`
    of them; anything else in `src` (README.md, a trainer's .bin files) is left unread."""
    missing = [name for name in REQUIRED_FILES if not (src / name).is_file()]
    if missing:
        raise BadRequestError(
            f"lora_path {str(src)!r} holds no {' or '.join(missing)}: give a directory with "
            f"{' and '.join(REQUIRED_FILES)} (PEFT's save_pretrained writes them)",
            code="lora_path_not_found", param="lora_path")
    target, budget = Path(tempfile.mkdtemp(prefix="moeplex-lora-path-")), max_bytes
    try:
        for name in REQUIRED_FILES:
            with open(src / name, "rb") as source, open(target / name, "wb") as out:
                while chunk := source.read(min(_CHUNK, budget + 1)):
                    budget -= len(chunk)
                    if budget < 0:
                        raise PayloadTooLargeError(
                            f"the adapter files in lora_path are over this server's adapter "
                            f"size limit of {max_bytes} bytes", code="adapter_too_large")
                    out.write(chunk)
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise BadRequestError(f"cannot read lora_path {str(src)!r}: {exc.strerror}",
                              code="lora_path_unreadable", param="lora_path") from exc
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target

"""The upload reader stops reading a body as soon as it is over the limit, declared or not."""
import asyncio

import pytest
from starlette.requests import Request

from deployments import uploads
from deployments.errors import PayloadTooLargeError, RequestTimeoutError
from deployments.uploads import read_upload

BOUNDARY = "moeplexboundary"


def _multipart(files: dict[str, bytes]) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nad\r\n".encode()]
    for filename, data in files.items():
        head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _chunked_request(body: bytes, chunk: int, consumed: list[int]) -> Request:
    """A request without Content-Length (chunked transfer), counting the chunks read."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    async def receive():
        index = consumed[0]
        consumed[0] += 1
        return {"type": "http.request", "body": chunks[index], "more_body": index + 1 < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "query_string": b"",
             "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]}
    return Request(scope, receive), len(chunks)


def test_undeclared_oversize_body_is_refused_before_it_is_all_read():
    body = _multipart({"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * (4 << 20)})
    consumed = [0]
    request, num_chunks = _chunked_request(body, 64 << 10, consumed)
    with pytest.raises(PayloadTooLargeError):
        asyncio.run(read_upload(request, max_bytes=100_000))
    assert consumed[0] < num_chunks // 2  # stopped near the limit, not after spooling 4 MiB


def test_chunked_upload_within_the_limit_is_read():
    files = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\1" * 5000}
    request, _ = _chunked_request(_multipart(files), 1000, [0])
    name, tmp = asyncio.run(read_upload(request, max_bytes=100_000))
    try:
        assert name == "ad"
        assert {p.name: p.read_bytes() for p in tmp.iterdir()} == files
    finally:
        import shutil
        shutil.rmtree(tmp)


def test_an_upload_that_stops_sending_is_a_408_after_the_idle_timeout(monkeypatch):
    body = _multipart({"adapter_config.json": b"{}", "adapter_model.safetensors": b"\1" * 5000})
    sent = []

    async def receive():  # the first 1000 bytes, then nothing ever again
        if sent:
            await asyncio.Event().wait()
        sent.append(1)
        return {"type": "http.request", "body": body[:1000], "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "query_string": b"",
             "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]}
    monkeypatch.setattr(uploads, "UPLOAD_IDLE_TIMEOUT_S", 0.2)
    with pytest.raises(RequestTimeoutError, match="after 1000 bytes") as caught:
        asyncio.run(read_upload(Request(scope, receive), max_bytes=100_000))
    assert caught.value.status_code == 408 and caught.value.code == "upload_stalled"

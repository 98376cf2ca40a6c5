"""An S3 endpoint that accepts connections and never answers: store calls fail with the store's
typed unavailable error within the client's timeouts instead of hanging for the stall."""
import socket
import threading
from pathlib import Path

import pytest

from adapter_store.errors import StoreUnavailableError
from adapter_store.s3 import S3Store
from adapter_store.versions import AdapterInfo

HANG_GUARD_S = 60.0  # well above what the timeouts allow; a regression fails here, it never hangs


class StalledEndpoint:
    """A TCP server on 127.0.0.1 (a free port) that accepts every connection and sends nothing."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            self._held.append(conn)

    def stop(self):
        self._listener.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def stalled(aws_env):
    endpoint = StalledEndpoint()
    yield endpoint
    endpoint.stop()


def _outcome(call) -> BaseException | None:
    """Run `call` on a daemon thread; the exception it raised, or fail if it outlives the guard."""
    raised: list[BaseException | None] = [None]

    def target():
        try:
            call()
        except BaseException as exc:
            raised[0] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"the store call still hangs after {HANG_GUARD_S} s"
    return raised[0]


def _calls(store: S3Store, adapter: Path, base_model: Path, tmp_path: Path) -> dict:
    manifest = {"files": {"adapter_model.safetensors": {"size": 40 << 10, "sha256": "0" * 64}}}
    info = AdapterInfo("acme", "ad", "v1", manifest)
    return {"resolve": lambda: store.resolve("acme", "ad"),
            "list": lambda: store.list_adapters("acme"),
            "put": lambda: store.put("acme", "ad", adapter, base_model),
            "download": lambda: store.download(info, "adapter_model.safetensors", tmp_path / "w")}


@pytest.mark.parametrize("call", ["resolve", "list", "put", "download"])
def test_a_stalled_endpoint_fails_each_store_call_with_a_timeout_error(stalled, adapter, base_model,
                                                                       tmp_path, call):
    store = S3Store("s3://bucket/p", endpoint_url=stalled.url, region="us-east-1", chunk_bytes=16 << 10,
                    max_attempts=2, backoff_s=0.05, timeout_s=0.5, connect_timeout_s=0.5)
    raised = _outcome(_calls(store, adapter, base_model, tmp_path)[call])
    assert isinstance(raised, StoreUnavailableError), raised
    assert raised.code == "timeout" and "did not answer" in str(raised)


def test_a_stalled_endpoint_fails_a_resolve_within_the_default_timeouts(stalled):
    """The defaults (5 s connect, 10 s read, 2 attempts) bound a stalled resolve to ~20 s."""
    store = S3Store("s3://bucket/p", endpoint_url=stalled.url, region="us-east-1")
    raised = _outcome(lambda: store.resolve("acme", "ad"))
    assert isinstance(raised, StoreUnavailableError) and raised.code == "timeout", raised


def test_timeouts_and_attempts_must_be_positive(aws_env):
    for bad in ({"max_attempts": 0}, {"timeout_s": 0}, {"connect_timeout_s": -1}):
        with pytest.raises(ValueError):
            S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:1", region="us-east-1", **bad)

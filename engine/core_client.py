"""EngineCoreClient: AsyncLLMEngine's interface with the engine in a process of its own.

The replica's process (HTTP streaming, Ray's per-item work, tokenising) and the loop that
feeds the GPU then hold separate interpreters: per-token work in one never takes the GIL from
the other. Requests are tokenised and validated here (a bad one never reaches the core), sent
over a socket pair to `engine.core_process`, and each engine step comes back as one message
that a reader thread hands to the waiting streams in one go (engine.streams).

If the core process dies, every open stream ends with EngineUnavailableError, `check_health`
raises and `on_core_exit` is called (a Serve replica ends itself there, so that Serve's routers
stop choosing it at once and Serve replaces it). If the replica's process dies (Serve or Ray
kills it), the core
exits by itself (engine.core_process.watch_parent).
"""
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.async_engine import shutdown_outputs
from engine.config import EngineConfig
from engine.errors import EngineError, EngineUnavailableError
from engine.frontend import EngineFrontend
from engine.inputs import InputProcessor, load_tokenizer
from engine.sequence import Sequence
from engine.streams import OutputStreams, RequestStream

log = logging.getLogger(__name__)


class EngineCoreClient(EngineFrontend):
    def __init__(self, config: EngineConfig, start_timeout_s: float | None = None):
        self.config = config
        self._send_lock = threading.Lock()
        self._streams = OutputStreams()
        self._stopped = False
        # called on the reader thread once the core went away unasked, after the open streams
        # ended (the replica ends itself: deployments.replica)
        self.on_core_exit: Callable[[], None] | None = None
        self._proc, self._conn = _spawn_core()
        try:
            self._conn.send(("config", config))
            info = self._wait_ready(start_timeout_s)
        except BaseException:
            self._kill()
            raise
        self.num_lora_slots: int = info["num_lora_slots"]
        self.memory_summary: str = info["memory"]
        self.startup_seconds: dict = info["startup_seconds"]
        self._stats: dict = info["stats"]
        self.gc_frozen_objects: int = info["gc_frozen_objects"]  # the core's start-up heap (engine.heap)
        self.tokenizer = load_tokenizer(config)
        self.inputs = InputProcessor(self.tokenizer, info["vocab_size"], config.max_model_len,
                                     self.num_lora_slots > 0, info["eos_token_ids"])
        self._reader = threading.Thread(target=self._read, name="moeplex-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float | None) -> dict:
        # weights, graph capture and warm-up can take minutes at real sizes: no timeout unless asked
        if timeout_s is not None and not self._conn.poll(timeout_s):
            raise EngineError(f"the engine core did not start within {timeout_s} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.wait(timeout=10)
            raise EngineError(f"the engine core exited during start-up (exit code {code}); "
                              "its log is in this replica's stderr") from exc
        if kind == "failed":
            raise EngineError(f"the engine core failed to start: {payload}")
        return payload

    # ---- requests ---------------------------------------------------------------
    def _open_and_submit(self, seq: Sequence) -> RequestStream:
        stream = self._streams.open(seq.request_id)
        try:
            self._send(("add", seq))
        except BaseException:
            self._streams.close(seq.request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except EngineError:
            pass  # the core is gone: nothing holds the request any more

    def stats(self) -> dict:
        return dict(self._stats)

    def check_health(self) -> None:
        if self._proc.poll() is not None:
            raise EngineUnavailableError(f"the engine core process exited (code {self._proc.returncode})")
        if not self._reader.is_alive():
            raise EngineUnavailableError("the engine core's reader thread has stopped")

    def shutdown(self) -> None:
        """Stop the core process; streams still open end with EngineError."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._send(("shutdown",), checked=False)
            self._proc.wait(timeout=30)
        except (EngineError, subprocess.TimeoutExpired):
            self._kill()
        self._conn.close()
        self._streams.deliver(shutdown_outputs(self._streams.open_ids()))

    # ---- plumbing ---------------------------------------------------------------
    def _check_running(self) -> None:
        if self._stopped:
            raise EngineUnavailableError("the engine is shut down")
        if self._proc.poll() is not None:
            raise EngineUnavailableError(f"the engine core process exited (code {self._proc.returncode})")

    def _send(self, message: tuple, checked: bool = True) -> None:
        if checked:
            self._check_running()
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            try:  # a core that just died reports as exited, not as a broken pipe
                code = self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                raise EngineUnavailableError(f"the engine core is unreachable: {type(exc).__name__}") from exc
            raise EngineUnavailableError(f"the engine core process exited (code {code})") from exc

    def _read(self) -> None:
        """Reader thread: one message per engine step, handed to the streams in one go."""
        try:
            while True:
                kind, outputs, stats = self._conn.recv()
                if stats is not None:
                    self._stats = stats
                if outputs:
                    self._streams.deliver(outputs)
        except (EOFError, OSError, ValueError):
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be read ends the client, loudly
            log.exception("engine core client: reading from the core failed")
        gone = not self._stopped
        if gone:
            log.error("the engine core process went away (exit code %s)", self._proc.poll())
        self._streams.deliver(shutdown_outputs(self._streams.open_ids(),
                                               "the engine core stopped before the request finished"))
        if gone and self.on_core_exit is not None:
            self.on_core_exit()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)


def _spawn_core() -> tuple[subprocess.Popen, Connection]:
    """Start `python -m engine.core_process FD PID` with this interpreter and import path."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # e.g. Ray's working_dir
    try:
        proc = subprocess.Popen([sys.executable, "-m", "engine.core_process", str(theirs.fileno()),
                                 str(os.getpid())], pass_fds=[theirs.fileno()], env=env)
    finally:
        theirs.close()
    return proc, Connection(ours.detach())

"""AsyncLLMEngine: an LLMEngine stepped on a background thread, with asyncio streams per request.

Requests are validated on the caller's thread (bad input raises there), handed to the
engine thread through an inbox, and each step's outputs go to their requests' queues in one
hand-over (engine.streams). A failing step fails the requests it held, never the loop.
`EngineCoreClient` (engine.core_client) offers the same interface with the engine in a
process of its own; this one keeps it in the caller's process (scripts, tests, benchmarks).
"""
import logging
import threading
from collections.abc import Callable

from engine.config import EngineConfig
from engine.errors import EngineError, EngineUnavailableError
from engine.frontend import EngineFrontend
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sequence import Sequence
from engine.streams import OutputStreams, RequestStream

log = logging.getLogger(__name__)


class AsyncLLMEngine(EngineFrontend):
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05):
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.inputs = self.engine.inputs
        self.num_lora_slots = self.engine.runner.num_lora_slots
        self.memory_summary = self.engine.memory_summary()
        self.startup_seconds = dict(self.engine.runner.startup_seconds)
        self.idle_wait_s = idle_wait_s
        self._inbox: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams = OutputStreams()
        self._stats: dict = self.engine.stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="moeplex-engine", daemon=True)
        self._thread.start()

    def _check_running(self) -> None:
        if self._stopped:
            raise EngineUnavailableError("the engine is shut down")

    def _open_and_submit(self, seq: Sequence) -> RequestStream:
        with self._lock:
            self._check_running()  # under the lock: shutdown fails the streams it sees
            stream = self._streams.open(seq.request_id)
        self._submit(lambda: self.engine.add_sequence(seq))
        return stream

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._streams.deliver([o] if (o := self.engine.abort(request_id)) else []))

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise EngineUnavailableError("the engine thread has stopped")

    def shutdown(self) -> None:
        """Stop the step thread; streams still open end with EngineError."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()
        self._streams.deliver(shutdown_outputs(self._streams.open_ids()))

    def _submit(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(action)
        self._wake.set()

    def _loop(self) -> None:
        turns = self.engine.turns
        while not self._stopped:
            turns.begin()
            with self._lock:
                actions, self._inbox = self._inbox, []
            for action in actions:
                self._run_action(action)
            if actions:
                with self._lock:
                    self._stats = self.engine.stats()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            turns.stepping()
            outputs = step_or_fail(self.engine)
            with self._lock:
                self._stats = self.engine.stats()
            self._streams.deliver(outputs)  # a step with only adapter loads pending blocks ~ms itself
            turns.end(busy=True)

    def _run_action(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            log.warning("engine request action failed: %s", exc)


def step_or_fail(engine: LLMEngine) -> list[RequestOutput]:
    """One step's outputs; a step that raises fails the requests the engine held, not the loop."""
    try:
        return engine.step()
    except Exception as exc:  # keep serving
        log.exception("engine step failed")
        outputs = []
        for request_id in list(engine.seqs):
            out = engine.abort(request_id)
            if out is not None:
                out.error = exc if isinstance(exc, EngineUnavailableError) else (
                    EngineError(f"engine step failed: {type(exc).__name__}: {exc}"))
                outputs.append(out)
        return outputs


def shutdown_outputs(request_ids: list[str],
                     message: str = "the engine was shut down before the request finished") -> list[RequestOutput]:
    """The final output of each request still open when its engine went away."""
    return [RequestOutput(rid, finished=True, finish_reason="abort", error=EngineUnavailableError(message))
            for rid in request_ids]

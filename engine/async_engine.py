"""AsyncLLMEngine: an LLMEngine stepped on a background thread, with asyncio streams per request.

Requests are validated on the caller's thread (bad input raises there), handed to the
engine thread through an inbox, and each output is pushed to its request's asyncio.Queue
with `call_soon_threadsafe`. A failing step fails the requests it held, never the loop.
"""
import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.errors import EngineError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import LoRARequest

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.idle_wait_s = idle_wait_s
        self._inbox: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats: dict = self.engine.stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="moeplex-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora: LoRARequest | None = None,
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs of one request; raises InvalidRequestError / AdapterLoadError."""
        if self._stopped:
            raise EngineError("the engine is shut down")
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        seq = self.engine.make_sequence(request_id, prompt, params, lora, tenant)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped:  # checked again under the lock: shutdown fails the streams it sees
                raise EngineError("the engine is shut down")
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(lambda: self.engine.add_sequence(seq))
        finished = False
        try:
            while not finished:
                out: RequestOutput = await queue.get()
                if out.error is not None:
                    raise out.error
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away: free the sequence's blocks and slot
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._dispatch([o] if (o := self.engine.abort(request_id)) else []))

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def shutdown(self) -> None:
        """Stop the step thread; streams still open end with EngineError."""
        with self._lock:
            self._stopped = True
            open_ids = list(self._streams)
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()
        message = "the engine was shut down before the request finished"
        self._dispatch([RequestOutput(rid, finished=True, finish_reason="abort", error=EngineError(message))
                        for rid in open_ids])

    def _submit(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(action)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
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
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail what the engine held, then go on
                log.exception("engine step failed")
                outputs = self._fail_all(exc)
            with self._lock:
                self._stats = self.engine.stats()
            self._dispatch(outputs)  # a step with only adapter loads pending blocks ~ms itself

    def _run_action(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            log.warning("engine request action failed: %s", exc)

    def _fail_all(self, exc: Exception) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.seqs):
            out = self.engine.abort(request_id)
            if out is not None:
                out.error = EngineError(f"engine step failed: {type(exc).__name__}: {exc}")
                outputs.append(out)
        return outputs

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                target = self._streams.get(out.request_id)
            if target is not None:
                loop, queue = target
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                except RuntimeError:  # the caller's event loop is closed
                    pass

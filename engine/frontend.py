"""EngineFrontend: the request side both async engines share (validate, stream, abort).

`AsyncLLMEngine` steps its engine on a thread of this process and `EngineCoreClient` in a
process of its own; both turn a request into a validated Sequence here, open its stream and
hand the sequence over with `_submit_sequence`, and read the stream as lists of outputs.
"""
import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from engine.fair_pool import FairPool
from engine.inputs import InputProcessor, request_tenant
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import LoRARequest, Sequence
from engine.streams import OutputStreams, RequestStream, read_batches

# prompts longer than this many characters are tokenised off the event loop
INLINE_TOKENIZE_CHARS = 2048
# ... and lists of more ids than this checked there (~50 ns an id: a list this long costs the
# loop ~1-2 ms, and the ids a replica tokenised on those threads already need not queue twice)
INLINE_CHECK_IDS = 32768
# ... on a few threads of their own: a flood of long prompts queues behind itself instead of
# taking every core (and the loop's GIL turns) from the short requests of other tenants, and
# the tenants with long inputs queued take those threads in turn (FairPool)
LONG_INPUT_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
_long_inputs = FairPool(LONG_INPUT_THREADS, "moeplex-long-input")
# structured output constraints compile on two threads of their own, so that a new schema's
# compile does not hold up the tokenising of long prompts
_constraints = ThreadPoolExecutor(2, thread_name_prefix="moeplex-constraint")


async def off_loop(fn, *args, tenant: str | None = None):
    """`fn(*args)` on the long-input threads, in `tenant`'s turn; cancelled with its caller
    while it waits there."""
    return await asyncio.wrap_future(_long_inputs.submit(tenant or "", fn, *args))


class EngineFrontend:
    inputs: InputProcessor
    _streams: OutputStreams

    def _check_running(self) -> None:
        """Raise EngineError when no engine is there to take requests."""
        raise NotImplementedError

    def _open_and_submit(self, seq: Sequence) -> RequestStream:
        """Open `seq`'s stream and hand `seq` to the engine (raise with no stream left open)."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate_batches(self, prompt: str | list[int], params: SamplingParams | None = None,
                               request_id: str | None = None, lora: LoRARequest | None = None,
                               tenant: str | None = None,
                               min_interval_s: float = 0.0) -> AsyncIterator[list[RequestOutput]]:
        """One request's outputs, as lists of those that arrived together (lists at least
        `min_interval_s` apart); raises InvalidRequestError / AdapterLoadError / EngineError."""
        self._check_running()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if params is not None and params.structured is not None:  # its compile, off the event loop
            seq = await asyncio.get_running_loop().run_in_executor(
                _constraints, self.inputs.make_sequence, request_id, prompt, params, lora, tenant)
        elif len(prompt) > (INLINE_TOKENIZE_CHARS if isinstance(prompt, str) else INLINE_CHECK_IDS):
            seq = await off_loop(self.inputs.make_sequence, request_id, prompt, params, lora, tenant,
                                 tenant=request_tenant(tenant, lora))
        else:
            seq = self.inputs.make_sequence(request_id, prompt, params, lora, tenant)
        stream = self._open_and_submit(seq)

        def on_exit(finished: bool) -> None:
            if not finished:  # the consumer went away: free the sequence's blocks and slot
                self.abort(request_id)
            self._streams.close(request_id)
        async for batch in read_batches(stream, on_exit, min_interval_s):
            yield batch

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora: LoRARequest | None = None,
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """One request's outputs one by one (see generate_batches)."""
        stream = self.generate_batches(prompt, params, request_id, lora, tenant)
        try:
            async for batch in stream:
                for out in batch:
                    yield out
        finally:
            await stream.aclose()

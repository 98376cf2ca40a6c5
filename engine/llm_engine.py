"""LLMEngine: add_request / step / abort. step() = schedule -> launch -> (schedule and launch the
next step) -> read back -> postprocess."""
import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from engine.block_manager import BlockManager, step_reserve
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineError, InvalidRequestError
from engine.heap import gc_pauses
from engine.inputs import InputProcessor, load_tokenizer
from engine.lora.manager import LoRAManager
from engine.model_runner import LaunchedStep, ModelRunner, StepResult
from engine.models.spec import spec_of
from engine.outputs import RequestOutput
from engine.prefix_cache import PrefixCache
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import LoRARequest, Sequence
from engine.turns import TurnClock

log = logging.getLogger(__name__)
LOAD_WAIT_S = 0.002  # longest a step with only adapter loads in flight blocks on them
COMPILE_THREADS = 2  # structured output constraints compiling at once
COMPILE_WAIT_S = 0.01  # longest a step with only compiles pending blocks on them (new messages wait as long)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.gc = gc_pauses()
        self.spec = spec_of(config)
        self.tokenizer = load_tokenizer(config)
        self.runner = ModelRunner(config, self.spec)
        if self.runner.num_kv_blocks * config.block_size < config.max_model_len:
            raise InvalidRequestError(f"num_kv_blocks={self.runner.num_kv_blocks} x block_size="
                                      f"{config.block_size} cannot hold one max_model_len sequence")
        cache = PrefixCache(config.block_size, config.prefix_cache_scope) if config.enable_prefix_caching else None
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                          step_reserve(config.max_num_batched_tokens, config.block_size,
                                                       config.max_num_seqs), cache)
        pools, shared = self.runner.slot_pools, self.runner.arena is not None
        self.lora_manager = None if pools is None else LoRAManager(
            pools, self.spec, config.max_lora_rank, self.runner.max_cpu_loras,
            failure_ttl_s=config.lora_failure_ttl_s, host_bytes=config.max_cpu_lora_bytes,
            kv=self.block_manager if shared else None, block_numel=self.runner.kv_block_numel)
        self.inputs = InputProcessor(self.tokenizer, self.spec.vocab_size, config.max_model_len,
                                     self.lora_manager is not None, self.spec.eos_token_ids)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   self.block_manager, self.lora_manager, config.max_model_len,
                                   prefetch_window=config.adapter_prefetch_window,
                                   max_adapter_wait_steps=config.max_adapter_wait_steps,
                                   slot_reclaim_steps=config.slot_reclaim_steps,
                                   max_staged_adapters=self.lora_manager.host_capacity if self.lora_manager else None)
        # the step scheduled ahead: launched and not read back, or (sched, None) not launched yet
        self._in_flight: tuple[SchedulerOutput, LaunchedStep | None] | None = None
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._seq_ids = itertools.count()
        self.last_step = {"num_seqs": 0, "num_tokens": 0, "num_adapters": 0, "num_preempted": 0}
        self.turns = TurnClock(self)  # the loop that steps this engine times its turns with it
        self.num_preemptions = 0
        # structured output requests whose constraint compiles on a thread (add_sequence), and the
        # outputs of those whose compile failed, until a step returns them
        self._compiling: dict[str, tuple[Sequence, Future]] = {}
        # (a pool's threads, which exit joins: a daemon thread inside xgrammar's native compile at
        # interpreter exit aborts the process; the limits of engine.structured bound the wait)
        self._compile_pool: ThreadPoolExecutor | None = None
        self._compile_failures: list[RequestOutput] = []

    # ---- requests ---------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                      lora: LoRARequest | None = None, tenant: str | None = None) -> Sequence:
        """Validate a request and build its Sequence (thread-safe: touches no engine state)."""
        return self.inputs.make_sequence(request_id, prompt, params, lora, tenant)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs or seq.request_id in self._compiling:
            raise InvalidRequestError(f"request_id {seq.request_id!r} is already in use")
        if seq.params.structured is not None:
            # compiled on a thread: a large schema's compile would stall every tenant's steps;
            # step() lets the sequence in once its matcher is made
            if self._compile_pool is None:
                self._compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="moeplex-constraint")
            self._compiling[seq.request_id] = (seq, self._compile_pool.submit(self.inputs.grammar_matcher,
                                                                              seq.params.structured))
            return
        self._enter(seq)

    def _enter(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.detokenizers[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer, seq.params.stop, include_stop=seq.params.include_stop_str_in_output,
            skip_special_tokens=seq.params.skip_special_tokens) if self.tokenizer is not None else None
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: LoRARequest | None = None, tenant: str | None = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, lora, tenant))

    def abort(self, request_id: str) -> RequestOutput | None:
        compiling = self._compiling.pop(request_id, None)
        if compiling is not None:
            compiling[1].cancel()
            return RequestOutput(request_id, finished=True, finish_reason="abort")
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        if self._in_flight is not None and all(s.is_finished for s, _ in self._in_flight[0].scheduled):
            self._in_flight = None  # nothing of it will be read; later steps queue behind it on the stream
        return self._final(seq, RequestOutput(request_id, finished=True, finish_reason="abort"))

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or self._in_flight is not None or bool(self._compiling)
                or bool(self._compile_failures))

    def _admit_compiled(self) -> None:
        """Sequences whose structured output constraint has compiled, into the scheduler; the
        outputs of those whose compile failed (the replica's process compiled it before, so
        only an engine fault gets here) into _compile_failures, which step() returns."""
        failed = self._compile_failures
        for request_id, (seq, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                seq.grammar = future.result()
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
                error = exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}")
                failed.append(RequestOutput(request_id, finished=True, finish_reason="abort", error=error))
                continue
            self._enter(seq)

    # ---- the step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Outputs of one step. With async scheduling the next step is scheduled (and, when it
        is a decode graph step, launched) before this one's tokens are read back, so the host's
        work hides behind the device."""
        if self._compiling:
            self._admit_compiled()
        current = self._take_in_flight()
        if current is None:
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                return self._failed_compiles() + self.postprocess(sched, self._idle(sched))
            current = (sched, self._launch(sched, None))
        early = self._launch_ahead(current[1]) if self.config.async_scheduling else []
        sched, launched = current
        return self._failed_compiles() + self.postprocess(sched, launched.result()) + early

    def _failed_compiles(self) -> list[RequestOutput]:
        """The failed compiles' outputs, once (kept until a step gets this far, so a step that
        raises before does not lose them)."""
        failed, self._compile_failures = self._compile_failures, []
        return failed

    def _take_in_flight(self) -> tuple[SchedulerOutput, LaunchedStep] | None:
        """The step the last call launched ahead, or the one it scheduled ahead but left to launch
        now that its sequences' tokens are known (less those that ended meanwhile)."""
        entry, self._in_flight = self._in_flight, None
        if entry is None or entry[1] is not None:
            return entry
        sched = entry[0]
        sched.scheduled = [(seq, n) for seq, n in sched.scheduled if not seq.is_finished]
        if not sched.scheduled:
            self.num_preemptions += sched.num_preempted  # its postprocess, which counts them, never runs
            return None
        return sched, self._launch(sched, None)

    def _launch_ahead(self, current: LaunchedStep) -> list[RequestOutput]:
        """Schedule the step after `current` and launch it if it is cheap to launch (a decode
        graph step, or any step with async_eager_steps); returns the failures its schedule found
        (reported with current's outputs, not a step later). An eager step's launch is host-bound
        (~0.1 s at 35 layers): launched ahead it would delay current's outputs by that much and
        hide nothing, so it is kept for the next call. A launch that raises is logged and the
        step left for the next call, so current's tokens are still read back."""
        ahead = self.scheduler.schedule()
        early = self._failed_outputs(ahead)
        ahead.failed = []
        if not ahead.scheduled:
            return early
        self._in_flight = (ahead, None)
        # a penalty reads the tokens so far and a structured output's mask follows them, so such a
        # step waits until they are all on the host
        history = any(seq.params.waits_for_tokens for seq, _ in ahead.scheduled)
        if not history and (self.config.async_eager_steps or self.runner.is_graph_step(ahead.scheduled)):
            try:
                self._in_flight = (ahead, self._launch(ahead, current))
            except Exception:
                log.exception("launching the next step failed; it runs after this one is read back")
        return early

    def execute(self, sched: SchedulerOutput, all_logits: bool = False) -> StepResult:
        """Launch one scheduled step and wait for it (tests: then postprocess(sched, result))."""
        return self._launch(sched, None, all_logits).result()

    def _launch(self, sched: SchedulerOutput, prev: LaunchedStep | None, all_logits: bool = False) -> LaunchedStep:
        launched = self.runner.launch(sched.scheduled, prev, all_logits)
        self.scheduler.launched(sched, launched.samples)
        return launched

    def _idle(self, sched: SchedulerOutput) -> StepResult:
        """Nothing to run: when requests wait on adapter loads, block briefly on those loads
        (GIL released) instead of returning to a caller that would spin on step()."""
        if self.lora_manager is not None and not sched.failed and self.scheduler.num_waiting:
            if not self.lora_manager.wait_for_loads(LOAD_WAIT_S):
                time.sleep(LOAD_WAIT_S)  # waiting, yet nothing in flight: back off, do not spin
        elif self._compiling and not sched.failed:  # only compiles pending: wait for one, do not spin
            wait_futures([future for _, future in self._compiling.values()], COMPILE_WAIT_S, FIRST_COMPLETED)
        return StepResult([])

    def postprocess(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        self._record(sched)
        outputs = self._failed_outputs(sched)
        if result.prompt_logprobs:  # before the tokens: the step that samples the first one scores the prompt's last
            for seq, _ in sched.scheduled:
                seq.prompt_logprobs.extend(result.prompt_logprobs.get(seq.seq_id, ()))
        logprobs = result.logprobs or {}
        for seq, token in self.scheduler.update_from_output(sched, result.token_ids, time.perf_counter()):
            outputs.append(self._token_output(seq, token, logprobs.get(seq.seq_id)))
        return outputs

    def _failed_outputs(self, sched: SchedulerOutput) -> list[RequestOutput]:
        return [self._final(seq, RequestOutput(seq.request_id, finished=True, finish_reason="abort",
                                               error=seq.error)) for seq in sched.failed]

    def _token_output(self, seq: Sequence, token: int, logprobs: tuple | None = None) -> RequestOutput:
        reason = self._stop_reason(seq, token)
        broken = None
        if seq.grammar is not None:
            reason, broken = self._follow_grammar(seq, token, reason)
        detok = self.detokenizers[seq.request_id]
        # the token that ended the output (EOS, a stop token id) is not text, unless asked for
        # (vLLM's include_stop_str_in_output): it shows with skip_special_tokens=false or when it
        # is not a special token
        text_ids = seq.output_token_ids[:-1] if reason == "stop" and not seq.params.include_stop_str_in_output \
            else seq.output_token_ids
        delta, stop_hit = ("", False) if detok is None else detok.update(
            text_ids, reason is not None, len(seq.output_token_ids) >= seq.params.min_tokens)
        if stop_hit and broken is None:  # a constraint's fault ends it as an error, stop string or not
            reason = "stop"
        # the text so far only on the last output (_final): each step's message to the replica
        # carries a token's delta, not a copy of everything before it
        out = RequestOutput(seq.request_id, text_delta=delta, token_ids_delta=[token], finished=reason is not None,
                            finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
                            num_output_tokens=len(seq.output_token_ids))
        out.error = broken
        if reason == "stop":
            out.stop_reason = detok.stopped_by if stop_hit else token if token in seq.params.stop_token_ids else None
        if logprobs is not None:
            out.logprobs = [logprobs]
        if len(seq.output_token_ids) == 1:
            out.timings = seq.timings()
            out.num_cached_tokens = seq.num_cached_tokens
            if seq.params.prompt_logprobs is not None:
                out.prompt_logprobs = [(seq.prompt_token_ids[0], None, []), *seq.prompt_logprobs]
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._final(seq, out)
        return out

    def _follow_grammar(self, seq: Sequence, token: int, reason: str | None) -> tuple[str | None, Exception | None]:
        """Feed `token` to seq's structured output matcher: (finish reason, error). A constraint
        that let no token through, or whose mask and matching took more than
        engine.structured.TOKEN_BUDGET_S of CPU for a token it goes on to (an ambiguous pattern
        grows with the output, and the step loop waits for it), ends its request with an error
        the tenant can act on."""
        walk = seq.grammar
        if walk.fault is None and reason != "stop":  # an end of sequence ends it whatever the matcher says
            start = time.thread_time()
            if not walk.accept(token):  # the mask allowed it: the engine's fault, not the request's
                error = EngineError(f"token {token} breaks the request's structured output constraint")
                log.error("request %s: %s", seq.request_id, error)
                return "abort", error
            if walk.is_terminated():  # an end of sequence that ignore_eos would skip
                return "stop", None
            if reason is None:  # it goes on: only then does the next token's cost matter
                walk.charge(time.thread_time() - start)
        if walk.fault is not None:
            return "abort", InvalidRequestError(walk.fault)
        return reason, None

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.spec.eos_token_ids):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_known_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _final(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        detok = None
        if self.seqs.get(seq.request_id) is seq:  # not a newer request that reuses the id
            del self.seqs[seq.request_id]
            detok = self.detokenizers.pop(seq.request_id, None)
        self.runner.release(seq)
        out.num_prompt_tokens, out.num_output_tokens = seq.num_prompt_tokens, len(seq.output_token_ids)
        out.num_cached_tokens = seq.num_cached_tokens
        out.text = out.text or (detok.sent if detok else "")
        out.timings = seq.timings()
        return out

    def _record(self, sched: SchedulerOutput) -> None:
        self.num_preemptions += sched.num_preempted
        adapters = {seq.lora.lora_name for seq, _ in sched.scheduled if seq.lora is not None}
        self.last_step = {"num_seqs": len(sched.scheduled), "num_tokens": sched.num_tokens,
                          "num_adapters": len(adapters), "num_preempted": sched.num_preempted}

    # ---- helpers ----------------------------------------------------------------
    def memory_summary(self) -> str:
        """The memory plan's line, and the host tier's bounds and how its memory is held."""
        plan, manager = self.runner.memory_plan.summary(), self.lora_manager
        if manager is None:
            return plan
        bound = f"{manager.host_bytes / 2**30:.1f} GiB" if manager.host_bytes is not None else "no byte bound"
        if manager.arena is not None:
            held = f"page-locked {manager.arena.piece_bytes >> 20} MiB at a time as it fills" \
                if manager.arena.pin else "pageable (CPU)"
        else:
            held = "pinned per adapter" if manager.pools.stream is not None else "pageable (CPU)"
        return f"{plan}; host tier up to {manager.host_capacity} adapters, {bound}, {held}"

    def stats(self) -> dict:
        lora = self.lora_manager.stats if self.lora_manager else None
        cache = self.block_manager.cache
        arena = self.lora_manager.arena if self.lora_manager else None
        return {
            "running": len(self.scheduler.running), "waiting": self.scheduler.num_waiting + len(self._compiling),
            "free_kv_blocks": self.block_manager.num_free_blocks, "num_kv_blocks": self.block_manager.num_blocks,
            "last_step_batch_size": self.last_step["num_seqs"], "last_step_tokens": self.last_step["num_tokens"],
            "last_step_adapters": self.last_step["num_adapters"], "num_preemptions": self.num_preemptions,
            "lora_slot_hits": lora.slot_hits if lora else 0, "lora_slot_misses": lora.slot_misses if lora else 0,
            "lora_slot_loads": lora.slot_loads if lora else 0, "lora_evictions": lora.evictions if lora else 0,
            "lora_host_loads": lora.host_loads if lora else 0,
            "lora_compactions": lora.compactions if lora else 0,
            "lora_bytes_compacted": lora.bytes_compacted if lora else 0,
            "lora_load_seconds": (lora.host_load_seconds + lora.slot_load_seconds) if lora else 0.0,
            "lora_failures": lora.failures if lora else 0,
            "lora_prefetches": self.scheduler.slots.num_prefetched, "aged_requests": len(self.scheduler.slots.aged),
            "lora_slot_preemptions": self.scheduler.slots.num_slot_preemptions,
            "warmup_seconds": self.runner.warmup_seconds,
            # the cyclic collector's stalls of this process (engine.heap): collections, seconds, longest
            "gc_collections": self.gc.collections, "gc_pause_seconds": self.gc.seconds,
            "gc_longest_pause_seconds": self.gc.longest,
            # the stepping loop's turns of engine.turns.SLOW_TURN_S or more (each logged), the longest
            "slow_turns": self.turns.slow_turns, "longest_turn_seconds": self.turns.longest,
            "num_lora_slots": self.runner.num_lora_slots,
            # the adapter heap (engine.lora.slots): its bytes, what resident adapters take, what loads moved
            "lora_heap_bytes": self.lora_manager.heap_bytes if self.lora_manager else 0,
            "kv_blocks_lent": self.block_manager.lent,  # KV blocks the heap holds now (kv_heap_sharing)
            # prefix caching (engine.prefix_cache): prompt tokens looked up at admission, those
            # found cached (vLLM's prefix_cache_queries / _hits), blocks holding a prefix now
            "prefix_cache_queries": cache.queried_tokens if cache else 0,
            "prefix_cache_hits": cache.hit_tokens if cache else 0,
            "prefix_cache_blocks": len(cache) if cache else 0,
            "lora_kv_blocks_borrowed": lora.kv_blocks_borrowed if lora else 0,
            "lora_kv_blocks_returned": lora.kv_blocks_returned if lora else 0,
            "lora_heap_bytes_used": self.lora_manager.heap_bytes_used if self.lora_manager else 0,
            "lora_bytes_loaded": lora.bytes_loaded if lora else 0,
            "lora_host_bytes_used": self.lora_manager.host_bytes_used if self.lora_manager else 0,
            # the host tier's arena (engine.lora.host_arena): bytes page-locked so far, seconds in
            # the driver's locking calls, images that got pageable memory instead
            "lora_host_pinned_bytes": arena.pinned_bytes if arena else 0,
            "lora_host_pin_seconds": arena.pin_seconds if arena else 0.0,
            "lora_host_unpinned_images": arena.unpinned_images if arena else 0,
            # vLLM's lora_requests_info labels: adapters with a request running / waiting
            "running_adapters": _adapter_names(self.scheduler.running),
            "waiting_adapters": _adapter_names(s for queue in self.scheduler.waiting.values() for s in queue),
            "resident_adapters": sorted(self.lora_manager.resident()) if self.lora_manager else [],
        }

    def generate(self, prompts: list, params: SamplingParams | None = None,
                 loras: list[LoRARequest | None] | None = None) -> list[dict]:
        """Run prompts to completion (a blocking helper for scripts and tests). Each result's
        `logprobs` holds RequestOutput.logprobs' entries, one a token, and `prompt_logprobs`
        RequestOutput.prompt_logprobs, where params asked."""
        loras = loras or [None] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, lora in zip(ids, prompts, loras):
            self.add_request(rid, prompt, params, lora)
        results = {rid: {"text": "", "token_ids": [], "logprobs": [], "prompt_logprobs": None,
                         "finish_reason": None, "stop_reason": None, "error": None} for rid in ids}
        while any(results[r]["finish_reason"] is None for r in ids):
            outputs = self.step()  # blocks briefly by itself while only adapter loads are pending
            for out in (o for o in outputs if o.request_id in results):
                res = results[out.request_id]
                res["text"] += out.text_delta
                res["token_ids"] += out.token_ids_delta
                res["logprobs"] += out.logprobs or []
                res["prompt_logprobs"] = out.prompt_logprobs or res["prompt_logprobs"]
                if out.finished:
                    res["finish_reason"], res["stop_reason"], res["error"] = out.finish_reason, out.stop_reason, out.error
        return [results[r] for r in ids]

    def shutdown(self) -> None:
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
        if self.lora_manager is not None:
            self.lora_manager.shutdown()
        self.runner.close()


def _adapter_names(seqs) -> list[str]:
    """The distinct `lora_name`s of `seqs`, sorted (O(len(seqs)))."""
    return sorted({seq.lora.lora_name for seq in seqs if seq.lora is not None})

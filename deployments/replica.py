"""`LLMServer`: one Serve replica owning one engine; streams token deltas to the ingress.

Requests arrive with `multiplexed_model_id` = the adapter version's `AdapterInfo.ref`,
`owner/name@version` (or "" for the base model; a hot adapter's ref comes as the payload's
"adapter" instead, so that Serve balances it over the replicas). `serve.multiplexed` keeps the
adapters this replica has fetched, so the router sends an adapter's requests to replicas that
already hold it; the loader reads that pinned version's manifest (the ingress already checked
the tenant may use it) and fetches its files through the DiskCache off the event loop (fetches
start before Serve's loader, side by side: adapter_fetch.py), then hands the engine a
`LoRARequest`. Every tenant's requests go into the
same engine, which batches them together.

The engine core runs in a process of its own (`EngineCoreClient`, unless
`engine_process=false`): this process tokenises, streams and talks to Ray, and its per-token
work never takes the GIL from the loop that feeds the GPU. Each engine step reaches the
replica as one message; a request's outputs that arrived together leave as one item.

The replica yields plain dicts (`text`, `token_ids`, `num_tokens`); the last one has
`finish_reason` and token counts, or `error` (status, message, code) when the request failed
after it was accepted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from ray import serve

from deployments.adapter_fetch import AdapterFetcher
from deployments.args import AppArgs
from deployments.errors import to_api_error
from deployments.loop_lag import LoopLag
from deployments.token_bytes import TokenTexts
from engine.errors import AdapterFilesError, AdapterLoadError, InvalidRequestError
from engine.frontend import INLINE_TOKENIZE_CHARS, off_loop
from engine.heap import freeze_startup_heap

logger = logging.getLogger("ray.serve")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of a completion
_STATS_PERIOD_S = 1.0
# an adapter whose refetched, verified files the engine still cannot read within this long is
# refused (422) rather than fetched again for every request
REFETCH_INTERVAL_S = 60.0
_ADAPTER_NAME_STATS = ("running_adapters", "waiting_adapters", "resident_adapters")


def _failed(task: asyncio.Task) -> bool:
    """Whether a finished task failed (reading its exception, so none goes unretrieved)."""
    return task.done() and (task.cancelled() or task.exception() is not None)


class _FilesUnreadable(Exception):
    """The engine could not read a request's adapter files before its first token."""


class _AdapterEntry:
    """What Serve's multiplexed LRU holds for an adapter: the fetch under way, and the
    LoRARequest once fetched."""

    __slots__ = ("fetching", "lora", "refetched", "refetched_at")

    def __init__(self):
        self.fetching: asyncio.Task | None = None
        self.lora = None
        self.refetched, self.refetched_at = None, 0.0  # the LoRARequest of the last refetch, when


class LLMServer:
    def __init__(self, args: AppArgs):
        from adapter_store import DiskCache
        from engine import AsyncLLMEngine, EngineCoreClient

        from deployments.metrics import ReplicaMetrics
        from deployments.model_files import ensure_model

        self._args = args
        self._model_dir = ensure_model(args)
        engine_class = EngineCoreClient if args.engine_process else AsyncLLMEngine
        config = args.engine_config(self._model_dir)
        self._ranks = None
        if config.world_size > 1:  # ranks 1..N-1 as actors on the other GPUs of this replica's bundles
            from deployments.ranks import RankActors
            self._ranks = RankActors(config)
        try:
            self._engine = engine_class(config)
        except BaseException:
            if self._ranks is not None:
                self._ranks.close()
            raise
        if args.engine_process:
            self._engine.on_core_exit = _end_replica
        self._store = args.open_store()
        self._cache = DiskCache(args.cache_path("adapter-cache"), args.disk_cache_bytes)
        self._fetcher = AdapterFetcher(self._store, self._cache)
        self._metrics = ReplicaMetrics()
        self._loop_lag = LoopLag("engine replica", self._metrics.loop_lag.observe)
        self._token_texts = TokenTexts(self._engine.tokenizer)  # for logprobs
        # Wired at init so `max_num_models_per_replica` comes from the app's args; Serve keeps
        # its LRU on the function object, so it wraps a plain function, not a bound method.
        async def load_adapter(model_id: str):
            return await self._load_adapter(model_id)

        _log_startup(args, self._model_dir, self._engine)
        per_replica = args.adapters_per_replica(self._engine.num_lora_slots)
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=per_replica)(load_adapter)
        self._stats_task: asyncio.Task | None = None
        logger.info("froze %d start-up objects out of the garbage collector's walks", freeze_startup_heap())

    async def _load_adapter(self, model_id: str) -> "_AdapterEntry":
        """Multiplexed loader: enters `owner/name@version` in Serve's per-replica LRU, which routes
        that adapter's requests here. Serve holds one lock around every call of it, so it does no
        I/O: a store fetch inside it made every other adapter's request wait behind the fetches
        queued there (H200, one tenant's 24 streams over 12 fresh 280 MB adapters: another
        tenant's adapter, dropped from the LRU, waited ~1.3 s for the lock). The entry's first
        request fetches the adapter after the lock (`_adapter_request`)."""
        self._metrics.adapter_loads.inc()
        return _AdapterEntry()

    async def _adapter_request(self, model_id: str):
        """The request's LoRARequest. Serve's LRU entry for the adapter fetches its directory once
        (store -> disk cache, beside other adapters' fetches) and keeps it while Serve keeps the
        entry: as when the LRU held the LoRARequest itself, a request on a kept entry touches
        neither disk nor store, so an adapter the engine holds in memory keeps serving through a
        store outage or after the disk cache dropped its files."""
        entry = await self._get_adapter(model_id)
        if entry.lora is None:
            if entry.fetching is None or _failed(entry.fetching):  # first request, or a retry
                entry.fetching = asyncio.get_running_loop().create_task(self._fetch_adapter(model_id))
                entry.fetching.add_done_callback(_failed)  # retrieved even when its waiters left
            entry.lora = await asyncio.shield(entry.fetching)  # a cancelled request leaves it to the others
        self._metrics.adapter_requests.inc()
        return entry.lora

    async def _fetch_adapter(self, model_id: str):
        from engine import LoRARequest

        started = time.perf_counter()
        local_dir = await self._fetcher.fetch(model_id)
        seconds = time.perf_counter() - started
        self._metrics.adapter_load_latency.observe(seconds)
        logger.info("fetched adapter %s into %s in %.3f s", model_id, local_dir, seconds)
        return LoRARequest(lora_name=model_id, lora_path=str(local_dir))

    def _ensure_stats_task(self) -> None:
        self._loop_lag.ensure_started()
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        while True:
            self._metrics.engine_stats(self._engine.stats())
            await asyncio.sleep(_STATS_PERIOD_S)

    def _prepare(self, request: dict):
        # tokenised once, here, and the engine handed the ids (checked as the engine checks text)
        if request.get("truncate_prompt_tokens") is not None:
            prompt = self._last_tokens(request, request["truncate_prompt_tokens"])
        else:
            prompt = self._engine.inputs.tokenize(self._prompt_of(request), _special_tokens(request))
        room = self._args.max_model_len - len(prompt)
        max_tokens = request.get("max_tokens")
        if max_tokens is None:  # OpenAI's defaults: a chat gets the room its prompt leaves, a completion 16
            max_tokens = max(1, room) if request.get("messages") is not None else COMPLETION_MAX_TOKENS
        if max_tokens > room:  # refused, as by OpenAI and vLLM, rather than cut short at the context's end
            field = request.get("max_tokens_field", "max_tokens")
            context = (f"this model's context is {self._args.max_model_len} tokens and the prompt "
                       f"takes {len(prompt)}")
            if request.get("max_tokens") is None:  # the client sent none: say which default did not fit
                raise InvalidRequestError(
                    f"{context}, leaving {room} for output, less than the {max_tokens} a completion "
                    f"gets when {field} is not given; send {field} of at most {room}", field,
                    code="max_tokens_too_large")
            raise InvalidRequestError(
                f"{field}={max_tokens} is too large: {context} "
                f"({max_tokens} > {self._args.max_model_len} - {len(prompt)}); ask for at most {room}",
                field, code="max_tokens_too_large")
        return prompt, self._sampling_params(request, max_tokens)

    def _last_tokens(self, request: dict, keep: int) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: max_model_len of
        them), a BOS the tokenizer adds kept first; then checked as any prompt is."""
        limit = self._args.max_model_len if keep == -1 else keep
        if limit > self._args.max_model_len:
            raise InvalidRequestError(f"truncate_prompt_tokens={keep} is more than this model's context "
                                      f"({self._args.max_model_len}); ask for at most that, or -1",
                                      "truncate_prompt_tokens")
        prompt = self._prompt_of(request)
        if isinstance(prompt, str):
            prompt = self._engine.inputs.encode_to(prompt, _special_tokens(request), limit, keep="last")
            cut = len(prompt) >= limit  # or it fit exactly: told apart only by another whole encode
        else:
            cut = len(prompt) > limit
        # echo gives back what the model read where the prompt was cut (_stream), the prompt as sent where not
        request["prompt_cut"] = cut
        return self._engine.inputs.tokenize(list(prompt[-limit:]))

    def _prompt_of(self, request: dict) -> str | list[int]:
        if request.get("messages") is None:
            return request["prompt"]
        if self._engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so no chat template: it serves "
                                      "completions of token ids only", "messages")
        from jinja2 import TemplateError

        options = {"add_generation_prompt": True, **(request.get("template_options") or {})}
        try:
            return self._engine.tokenizer.apply_chat_template(
                request["messages"], tools=request.get("tools"), tokenize=False, **options)
        # the request's doing, a 400: the template's raise_exception about the conversation, a
        # turn to continue it cannot find, or a variable of the request's it cannot compute with
        # ("Today: " + 5)
        except (TemplateError, ValueError) as exc:
            raise InvalidRequestError(f"the chat template refused these messages: {exc}", "messages") from exc
        except (TypeError, ArithmeticError) as exc:
            field = "chat_template_kwargs" if request.get("template_variables") else "messages"
            raise InvalidRequestError(f"the chat template cannot render this request: {type(exc).__name__}: "
                                      f"{exc}", field) from exc

    def _sampling_params(self, request: dict, max_tokens: int):
        from engine import SamplingParams

        sampling = dict(request.get("sampling") or {})
        sampling["stop"] = tuple(sampling.get("stop") or ())
        return SamplingParams(max_tokens=max_tokens, **sampling)

    async def generate(self, request: dict):
        """Stream `{"text", ...}` dicts for one request; see the module docstring."""
        entered = time.perf_counter()
        self._ensure_stats_task()
        rid, tenant = request["request_id"], request["tenant"]
        try:
            # a hot adapter comes in the payload, balanced over the replicas (hot_adapters.py)
            model_id = serve.get_multiplexed_model_id() or request.get("adapter") or ""
            lora = await self._adapter_request(model_id) if model_id else None
            fetched = time.perf_counter()
            # chat templates are applied off the event loop, and long inputs on the engine
            # frontend's long-input threads, where it tokenises long prompts
            messages = request.get("messages")
            if _input_chars(request) > INLINE_TOKENIZE_CHARS:
                prompt, params = await off_loop(self._prepare, request, tenant=tenant)
            elif messages is not None or request.get("truncate_prompt_tokens") is not None:
                # (the first truncation copies the tokenizer: InputProcessor.encode_to)
                prompt, params = await asyncio.to_thread(self._prepare, request)
            else:
                prompt, params = self._prepare(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error item
            yield _error_item(rid, exc, request)
            return
        timing = {"fetch": fetched - entered, "prepare": time.perf_counter() - fetched}
        try:
            async for item in self._stream(rid, tenant, prompt, params, lora, entered, timing, request,
                                           retry_unreadable=lora is not None):
                yield item
            return
        except _FilesUnreadable as failure:
            cause = failure.__cause__
            logger.warning("request %s: the engine could not read adapter %s's files in %s (%s)", rid,
                           model_id, lora.lora_path, cause)
        try:
            lora = await self._refetch_adapter(model_id, lora, cause.files)
        except Exception as exc:  # noqa: BLE001 - e.g. the store is unreachable: a 503
            yield _error_item(rid, exc, request)
            return
        async for item in self._stream(rid, tenant, prompt, params, lora, entered, timing, request):
            yield item

    async def _refetch_adapter(self, model_id: str, unreadable, files: tuple | None = None):
        """The LoRARequest for `model_id` after the engine could not read `unreadable`'s files:
        the node's disk cache dropped them (its bound, other replicas' fetches) or holds them
        damaged, once the engine's host tier no longer had the adapter. The first request to
        report it drops the cache entry (unless its files are no longer `files`, those that
        failed: another replica fetched them again) and its Serve entry's request, so the files
        are fetched and verified again; later reports of the same files take that new fetch."""
        entry = await self._get_adapter(model_id)
        if entry.lora is not unreadable:  # another request's report fetched them already
            return await self._adapter_request(model_id)
        if unreadable is entry.refetched and time.monotonic() - entry.refetched_at < REFETCH_INTERVAL_S:
            # fetched and verified a moment ago, still unreadable: the content is at fault (the
            # engine's reader refuses what the store's checks passed), not this node's copy
            raise AdapterLoadError(f"adapter {model_id!r}: its files, fetched again and verified, "
                                   "still cannot be read by the engine")
        entry.lora = entry.fetching = None
        await asyncio.to_thread(self._cache.discard, Path(unreadable.lora_path), files)  # a file lock
        lora = await self._adapter_request(model_id)
        entry.refetched, entry.refetched_at = lora, time.monotonic()
        return lora

    async def _stream(self, rid: str, tenant: str, prompt, params, lora, entered: float, timing: dict,
                      request: dict, retry_unreadable: bool = False):
        """The request's items; the first with tokens carries `timing`: seconds this replica spent
        before the first token, by phase (its own `fetch` and `prepare`; `tokenize` until the
        engine's Sequence existed; the engine's phases, Sequence.timings; `deliver` from the
        engine's first token until it reached this stream; `first` in all), for the ingress's
        Server-Timing header. With `echo` (completions) the first such item's text starts with the
        prompt's, and its logprob entries, where asked for, with the prompt tokens' (the first's
        logprob None). retry_unreadable: raise _FilesUnreadable, not an error item, where the
        engine could not read the adapter's files before any token (the caller fetches them again)."""
        started, first_token_at, finished = time.perf_counter(), None, False
        echo = request.get("echo", False)
        batches = self._engine.generate_batches(prompt, params, request_id=rid, lora=lora, tenant=tenant,
                                                min_interval_s=self._args.stream_interval_ms / 1e3)
        try:
            async for batch in batches:
                token_ids, last_out = [t for o in batch for t in o.token_ids_delta], batch[-1]
                item = {"text": "".join(o.text_delta for o in batch), "token_ids": token_ids,
                        "num_tokens": len(token_ids)}
                if any(o.logprobs for o in batch):
                    item["logprobs"] = self._logprob_entries(
                        (token, *entry) for o in batch if o.logprobs
                        for token, entry in zip(o.token_ids_delta, o.logprobs))
                if first_token_at is None and token_ids:
                    item["prompt_tokens"] = last_out.num_prompt_tokens  # a stream's usage so far counts it
                    if echo:
                        # the prompt as sent: text comes back as it was, not as its ids decode
                        # (one cut by truncate_prompt_tokens as the ids the model read)
                        cut = request.get("prompt_cut", False)
                        sent = prompt if cut else request.get("prompt", prompt)
                        self._echo(item, sent, next((o.prompt_logprobs for o in batch if o.prompt_logprobs), None),
                                   added_specials=cut and isinstance(request.get("prompt"), str))
                    first_token_at = time.perf_counter()
                    engine_timings = dict(next((o.timings for o in batch if o.timings), None) or {})
                    arrived_at = engine_timings.pop("arrived_at", None)
                    made_at = engine_timings.pop("first_token_at", None)
                    if arrived_at is not None:
                        timing["tokenize"] = arrived_at - started
                    if made_at is not None:
                        engine_timings["deliver"] = first_token_at - made_at
                    item["timing"] = {**timing, **engine_timings, "first": first_token_at - entered}
                last = batch[-1]
                if last.finished:
                    finished = True
                    item.update(finish_reason=last.finish_reason, stop_reason=last.stop_reason,
                                prompt_tokens=last.num_prompt_tokens,
                                completion_tokens=last.num_output_tokens,
                                cached_tokens=last.num_cached_tokens)
                    ttft = None if first_token_at is None else first_token_at - started
                    decode = 0.0 if first_token_at is None else time.perf_counter() - first_token_at
                    self._metrics.finished(tenant, last.num_prompt_tokens, last.num_output_tokens,
                                           ttft, decode)
                yield item
        except (asyncio.CancelledError, GeneratorExit):  # closing the engine's stream aborts it
            # CancelledError while awaiting the engine, GeneratorExit when closed at a yield
            if not finished:
                logger.info("request %s cancelled by the caller", rid)
            raise
        except Exception as exc:  # noqa: BLE001 - engine errors (bad request, adapter load)
            if retry_unreadable and first_token_at is None and isinstance(exc, AdapterFilesError):
                raise _FilesUnreadable from exc
            yield _error_item(rid, exc, request)
        finally:
            await batches.aclose()

    def _echo(self, item: dict, prompt: str | list[int], prompt_logprobs: list | None,
              added_specials: bool = False) -> None:
        """Put the prompt before the first item's text (a token-id prompt as its decoded text;
        added_specials: ids of text the tokenizer added special tokens to, such as a BOS, which are
        not the prompt's text) and its tokens' logprob entries before the item's."""
        if not isinstance(prompt, str):
            prompt = self._engine.tokenizer.decode(prompt, skip_special_tokens=added_specials) \
                if self._engine.tokenizer is not None else ""
        item["text"] = prompt + item["text"]
        if prompt_logprobs is not None:
            item["logprobs"] = self._logprob_entries(prompt_logprobs) + item.get("logprobs", [])

    def _logprob_entries(self, logprobs) -> list:
        """The engine's logprobs (RequestOutput.logprobs) with each token as its text:
        [[text, logprob, [[alternative text, logprob], ...]], ...] (the ingress's ResponseBuilder
        makes OpenAI's shapes of them)."""
        text = self._token_texts  # a part of a character as its own bytes (deployments/token_bytes.py)
        return [[text(token), logprob, [[text(t), lp] for t, lp in alternatives]]
                for token, logprob, alternatives in logprobs]

    def __del__(self):
        # Serve calls this when it stops the replica (scale-down, redeploy), after the
        # requests in flight drained: stop the engine's step thread and adapter loader.
        engine, ranks = getattr(self, "_engine", None), getattr(self, "_ranks", None)
        if ranks is not None:
            ranks.closing = True  # the ranks end because rank 0 tells them to, not by failure
        if engine is not None:
            engine.shutdown()
        if ranks is not None:
            ranks.close()

    async def tokenize(self, request: dict) -> dict:
        """POST /tokenize's work (ingress.py): the ids /v1/completions or /v1/chat/completions would
        give the model for this prompt or these messages, `{"count", "max_model_len", "tokens",
        "token_strs"}` as vLLM answers; an error item for a request those routes would refuse."""
        try:
            if _input_chars(request) > INLINE_TOKENIZE_CHARS:  # as generate(): long inputs off the loop
                return await off_loop(self._tokenize_answer, request, tenant=request.get("tenant"))
            # short ones too: the first call copies the tokenizer (InputProcessor.encode_to)
            return await asyncio.to_thread(self._tokenize_answer, request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error item
            return _error_item(request["request_id"], exc, request)

    def _tokenize_answer(self, request: dict) -> dict:
        # past max_model_len too, as vLLM counts (a client measures a document to cut it up), up
        # to a bound: the list of ids is built in this process, and the body limit alone allows
        # tens of ids a context token
        limit = TOKENIZE_CONTEXTS * self._args.max_model_len
        if self._engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: there is no text to count here", "prompt")
        ids = self._engine.inputs.encode_to(self._prompt_of(request), _special_tokens(request), limit)
        if len(ids) >= limit:  # encode stops counting there
            raise InvalidRequestError(f"the prompt has at least {limit} tokens; /tokenize counts up to "
                                      f"{limit - 1} ({TOKENIZE_CONTEXTS}x this model's context)", "prompt")
        strs = self._engine.tokenizer.convert_ids_to_tokens(ids) if request.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": self._args.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, request: dict) -> dict:
        """POST /detokenize's work (ingress.py): `{"prompt": text}` of token ids, or an error item."""
        try:  # off the loop: up to TOKENIZE_CONTEXTS contexts of ids to check and decode
            return {"prompt": await asyncio.to_thread(self._text_of, request["tokens"])}
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error item
            return _error_item(request["request_id"], exc, request)

    def _text_of(self, ids: list[int]) -> str:
        if len(ids) > (limit := TOKENIZE_CONTEXTS * self._args.max_model_len):
            raise InvalidRequestError(f"{len(ids)} tokens are more than /detokenize takes ({limit}, "
                                      f"{TOKENIZE_CONTEXTS}x this model's context)", "tokens")
        self._engine.inputs.check_vocabulary(ids, "tokens")
        if self._engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: its ids have no text here", "tokens")
        return self._engine.tokenizer.decode(ids)

    async def ready(self) -> dict:
        """For the unauthenticated /ready: counts only, no tenant's adapter names. Raises where
        Serve's next health check would (a dead engine core), so /ready turns 503 at once rather
        than when Serve has counted enough failed checks."""
        self.check_health()
        stats = {k: v for k, v in self._engine.stats().items() if k not in _ADAPTER_NAME_STATS}
        # this replica's own event loop (it streams every request's tokens): a tail that its
        # lags explain is not the engine's
        stats.update(replica_loop_lags_over_100ms=self._loop_lag.over,
                     replica_loop_longest_lag_seconds=round(self._loop_lag.longest, 4))
        return {"model": str(self._model_dir), "stats": stats}

    async def metrics_snapshot(self) -> dict:
        """Running/waiting counts, adapter slots and the adapters of running and waiting requests,
        for the ingress's GET /metrics (Serve's broadcast to every replica). Reads the engine's
        last stats (refreshed every ~0.2 s): no round trip to the engine core."""
        from deployments.metrics import engine_snapshot

        return engine_snapshot(self._engine.stats())

    def check_health(self) -> None:
        """Serve calls this periodically: a dead engine core, or rank of a replica over several GPUs,
        fails it, and Serve replaces the replica."""
        if self._ranks is not None and self._ranks.failure is not None:
            raise RuntimeError(f"engine replica: {self._ranks.failure}")
        self._engine.check_health()


def _end_replica(grace_s: float = 1.0) -> None:
    """Exit this replica's process once its engine core went away. Until Serve had counted three
    failed health checks, its routers kept choosing the replica whose every request failed at once
    (its queue looked empty, and adapter and prefix affinity point at it): a dead actor they drop
    at once, and Serve starts another. `grace_s`: for the open streams' error events to leave."""
    logger.error("the engine core went away: ending this replica for Serve to replace it")
    time.sleep(grace_s)
    os._exit(1)


def _log_startup(args: AppArgs, model_dir, engine) -> None:
    """One block an operator reads once: what this replica serves, where, and what start-up cost."""
    config = engine.config
    where = "its own process" if args.engine_process else "a thread of the replica"
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in engine.startup_seconds.items())
    device = config.device if config.world_size == 1 else (
        f"{config.world_size} x {config.device} (tensor_parallel_size={config.tensor_parallel_size}, "
        f"expert_parallel_size={config.expert_parallel_size}; memory per rank)")
    logger.info("moeplex engine replica ready: model %s (%s) on %s, %s; engine core in %s\n"
                "  memory: %s\n  start-up: %s (total %.1f s)\n  adapter store: %s",
                args.model_name(), model_dir, device, config.torch_dtype, where,
                engine.memory_summary, parts, sum(engine.startup_seconds.values()), args.store_uri())


# the engine names a refused field as SamplingParams and its inputs do; where the request spelt it
# otherwise, the 400's param names the request's field
_CHAT_PARAMS = {"prompt": "messages", "logprobs": "top_logprobs"}
_COMPLETION_PARAMS = {"prompt_logprobs": "logprobs"}  # echo's prompt logprobs are asked for by logprobs


def _error_item(request_id: str, exc: BaseException, request: dict | None = None) -> dict:
    api_error = to_api_error(exc)
    level = logging.WARNING if api_error.status_code < 500 else logging.ERROR
    logger.log(level, "request %s failed: %s: %s", request_id, type(exc).__name__, exc,
               exc_info=api_error.status_code >= 500)
    param = api_error.param
    if request is not None and param == "structured":
        param = request.get("structured_field", param)
    elif request is not None and param is not None:
        param = (_CHAT_PARAMS if request.get("messages") is not None else _COMPLETION_PARAMS).get(param, param)
    return {"error": {"status": api_error.status_code, "type": api_error.error_type,
                      "message": api_error.message, "code": api_error.code, "param": param,
                      "retry_after_s": api_error.retry_after_s}}


TOKENIZE_CONTEXTS = 4  # POST /tokenize and /detokenize take up to this many contexts' tokens


def _special_tokens(request: dict) -> bool:
    """Whether a request's text gets the tokenizer's special tokens, as vLLM decides: a prompt
    yes, a rendered chat template no (it holds its own); the request's add_special_tokens over
    either."""
    return request.get("add_special_tokens", request.get("messages") is None)


def _input_chars(request: dict) -> int:
    """Characters of a request's prompt or of its messages' contents (their tool calls, and the
    tools the template renders, as JSON)."""
    messages = request.get("messages")
    if messages is None:
        return len(request["prompt"])
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content")))
                for m in messages)
    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    return chars + (len(json.dumps([request.get("tools"), calls])) if request.get("tools") or calls else 0)

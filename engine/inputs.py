"""InputProcessor: a request's prompt and options -> a validated Sequence.

It touches no engine state, so it runs wherever the request arrives: in the engine's own
process for `LLMEngine.add_request`, and in the replica's process for the engine core
client, where a bad request is refused before it costs the engine loop anything.
"""
import copy
import itertools
import threading
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import LoRARequest, Sequence
from engine.structured import PARAM as STRUCTURED_PARAM, Grammars


def load_tokenizer(config: EngineConfig):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
    if config.model is None or not (Path(config.model) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(config.model))


def request_tenant(tenant: str | None, lora: LoRARequest | None) -> str:
    """The tenant a request counts as: the one named, else (scripts, the engine's own tests) its
    adapter's owner, else none ("")."""
    return tenant if tenant is not None else (lora.owner if lora else "")


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, serves_adapters: bool,
                 eos_token_ids: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.serves_adapters = serves_adapters
        self.eos_token_ids = tuple(eos_token_ids)
        self._grammars: Grammars | None = None  # made at the first structured output request
        self._grammars_lock = threading.Lock()
        self._seq_ids = itertools.count()
        self._copies: dict = {}  # encode_to's (tokenizer, lock) by the end they keep, copied at first use
        self._copies_lock = threading.Lock()

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                      lora: LoRARequest | None = None, tenant: str | None = None) -> Sequence:
        """Validate a request and build its Sequence; raises InvalidRequestError."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        if lora is not None and not self.serves_adapters:
            raise InvalidRequestError("this engine was started with max_loras=0; it serves no adapters", "model")
        tenant = request_tenant(tenant, lora)
        if params.structured is not None:  # refused here, before the engine loop sees it
            self.grammars().compile(params.structured)
        # ids past the vocabulary are a client's mistake to report (vLLM's 400), not to drop
        for field, ids_of in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids),
                              ("allowed_token_ids", params.allowed_token_ids or ())):
            if bad := [t for t in ids_of if t >= self.vocab_size]:
                raise InvalidRequestError(f"{field} has token ids {bad[:5]} outside the vocabulary "
                                          f"[0, {self.vocab_size})", field)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        if params.allowed_token_ids and params.min_tokens and set(params.allowed_token_ids) <= ends:
            raise InvalidRequestError("allowed_token_ids holds only tokens that end the output, which min_tokens "
                                      "bans until then: allow others too, or drop min_tokens", "allowed_token_ids")
        return Sequence(next(self._seq_ids), request_id, ids, params, lora, tenant, time.perf_counter())

    def grammars(self) -> Grammars:
        """The compiler of structured output constraints for this tokenizer, made on the first
        request that asks (it reads the whole vocabulary)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; structured outputs need one", STRUCTURED_PARAM)
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._grammars

    def grammar_matcher(self, constraint: tuple[str, str]):
        """A new matcher of a structured output constraint (one per sequence)."""
        return self.grammars().matcher(constraint)

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """The prompt's ids, checked: not empty, in the vocabulary, shorter than max_model_len.
        Text gets the tokenizer's special tokens (a BOS where it adds one) unless
        add_special_tokens is false (a rendered chat template holds its own); ids are taken as
        they are."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens)
            if len(ids) >= self.max_model_len:  # encode stopped counting there
                raise self._too_long(f"at least {len(ids)}")
        else:
            if len(prompt) >= self.max_model_len:
                raise self._too_long(len(prompt))
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        self.check_vocabulary(ids, "prompt")
        return ids

    def check_vocabulary(self, ids: list[int], field: str) -> None:
        """InvalidRequestError naming `field` unless every id is in [0, vocab_size)."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", field)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, at most max_model_len of them: the tokenizer truncates in its
        own code, so a huge prompt costs its encoding (which leaves the GIL) but never a
        Python list of a million ids (which holds it: other requests on this process wait).
        add_special_tokens as the tokenizer takes it: HF's and vLLM's default for a text prompt
        is true (Mixtral's tokenizer puts its BOS first; Qwen3's adds nothing)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids instead of text")
        return self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                              max_length=self.max_model_len, return_attention_mask=False)["input_ids"]

    def encode_to(self, text: str, add_special_tokens: bool, max_length: int, keep: str = "first") -> list[int]:
        """encode(), cut at max_length instead of max_model_len (POST /tokenize counts past the
        context), keeping the first tokens or the last (vLLM's truncate_prompt_tokens; a BOS the
        tokenizer adds stays first either way). Each on a copy of the tokenizer of its own, one call
        at a time: a fast tokenizer keeps the last call's truncation (bound and side) in its Rust
        object, so another bound on the shared one, or two bounds at once on a copy, could cut an
        encode running on another thread at the wrong length."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids instead of text")
        with self._copies_lock:
            if keep not in self._copies:
                tokenizer = copy.deepcopy(self.tokenizer)
                tokenizer.truncation_side = "right" if keep == "first" else "left"
                self._copies[keep] = (tokenizer, threading.Lock())
        tokenizer, lock = self._copies[keep]
        with lock:
            return tokenizer(text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length,
                             return_attention_mask=False)["input_ids"]

    def _too_long(self, count) -> InvalidRequestError:
        return InvalidRequestError(f"prompt has {count} tokens; max_model_len is {self.max_model_len}: "
                                   "shorten the prompt", "prompt")

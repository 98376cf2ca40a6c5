"""SamplingParams of one request, validated at construction."""
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.structured import check_constraint

MAX_LOGPROBS = 20  # alternatives a token (OpenAI's top_logprobs bound, vLLM's max_logprobs default)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str = ()
    include_stop_str_in_output: bool = False  # vLLM's: the text keeps the stop string that ended it
    skip_special_tokens: bool = True  # vLLM's and transformers': special tokens left out of the text
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), over the
    # tokens generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's / transformers': a logit of a token seen in the prompt or the output is divided by
    # it when positive, multiplied when negative
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit, [-100, 100]
    # vLLM's: only these tokens may be sampled (with a structured output constraint, those it allows too)
    allowed_token_ids: tuple[int, ...] | list[int] | None = None
    # vLLM's: drop a token whose probability (after temperature) is under min_p x the most likely
    # one's; no end of sequence (EOS, stop_token_ids, stop strings) before min_tokens are made
    min_p: float = 0.0
    min_tokens: int = 0
    # log-probabilities of each sampled token and of this many most likely alternatives (0: the
    # sampled token's only; None: none), under the model's own distribution: the logits before
    # penalties, bias and temperature (vLLM's default, "raw_logprobs")
    logprobs: int | None = None
    # the same for each prompt token after the first (its logprob given the tokens before it, and
    # this many most likely tokens there): OpenAI's `echo` with `logprobs`, vLLM's prompt_logprobs.
    # Such a request's prompt is computed whole, never taken from the prefix cache
    prompt_logprobs: int | None = None
    # structured outputs (engine.structured): (kind, text), e.g. ("json_schema", '{"type": ...}'),
    # ("regex", ...), ("choice", '["yes", "no"]'), ("grammar", EBNF) or ("json_object", "")
    structured: tuple[str, str] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
               "temperature")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}", "top_k")
        _check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64),
               f"seed must be an integer in [-2**63, 2**64) (what torch.Generator takes), got {self.seed!r}", "seed")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}",
               "stop")
        _check(type(self.skip_special_tokens) is bool,
               f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}", "skip_special_tokens")
        _check(type(self.include_stop_str_in_output) is bool,
               f"include_stop_str_in_output must be true or false, got {self.include_stop_str_in_output!r}",
               "include_stop_str_in_output")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}", "stop_token_ids")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2.0 <= getattr(self, name) <= 2.0, f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        _check(0 < self.repetition_penalty <= 10,
               f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}", "repetition_penalty")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        _check(type(self.min_tokens) is int and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}",
               "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(self, name)
            _check(wanted is None or (type(wanted) is int and 0 <= wanted <= MAX_LOGPROBS),
                   f"{name} must be an integer in [0, {MAX_LOGPROBS}] (alternatives a token), got {wanted!r}", name)
        if self.structured is not None:
            self.structured = check_constraint(self.structured)
            # the constraint may leave only an end of sequence allowed, which min_tokens bans
            _check(self.min_tokens == 0, "min_tokens cannot be combined with a structured output constraint",
                   "min_tokens")
        if self.logit_bias:
            _check(all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                   "logit_bias maps token ids >= 0 to biases in [-100, 100]", "logit_bias")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            _check(isinstance(ids, (list, tuple)) and bool(ids) and all(type(t) is int and t >= 0 for t in ids),
                   f"allowed_token_ids must be a non-empty list of token ids >= 0, got {ids!r}", "allowed_token_ids")
            self.allowed_token_ids = tuple(sorted(set(ids)))

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the sequence's earlier tokens (a penalty is set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def waits_for_tokens(self) -> bool:
        """Whether a step that samples for this request needs its tokens so far on the host
        (a penalty's history, a structured output's mask)."""
        return self.uses_history or self.structured is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str, param: str | None = None) -> None:
    if not ok:
        raise InvalidRequestError(message, param)

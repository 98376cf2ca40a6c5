"""RequestOutput: one streamed update of one request."""
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # prompt tokens whose KV came from the prefix cache (engine.prefix_cache), on the first
    # token's output and the final one
    num_cached_tokens: int = 0
    text: str = ""  # all the text, on the last output
    error: Exception | None = None  # set when the request failed (e.g. AdapterLoadError)
    # on the first token's output and the final one: where the request's time went before its
    # first token, seconds by phase (Sequence.timings)
    timings: dict[str, float] | None = None
    # per token of token_ids_delta, when the request's SamplingParams.logprobs asked: (its
    # logprob, [(token id, logprob)] of the most likely tokens, most likely first)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # with SamplingParams.prompt_logprobs, on the first token's output: per prompt token, (its id,
    # its logprob given the tokens before it, [(token id, logprob)] of the most likely tokens
    # there); the first token's logprob is None and its list empty
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None
    # vLLM's: what stopped it, where finish_reason is "stop": the stop string or the stop token id
    # that matched; None for an end of sequence or a structured output's end
    stop_reason: int | str | None = None

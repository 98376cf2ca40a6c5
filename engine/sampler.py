"""Sampling of the next token per sequence: greedy, temperature, top-k, top-p, per-request seed.

B = sequences sampled this step, V = vocabulary.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.structured import apply_bitmask


@dataclass(slots=True)
class Penalties:
    frequency: Tensor    # [B] float32
    presence: Tensor     # [B] float32
    repetition: Tensor   # [B] float32, 1 = none
    output_ids: Tensor   # [B, L] int64: generated tokens, padded with V
    seen_ids: Tensor     # [B, L'] int64: prompt and generated tokens, padded with V


@dataclass(slots=True)
class SamplingTensors:
    temperatures: Tensor | None  # [B] float32, 0 = greedy (None when all_greedy)
    top_ps: Tensor | None        # [B] float32
    top_ks: Tensor | None        # [B] int64, V where no limit
    generators: list      # [B] torch.Generator or None (None: the engine's shared generator)
    all_greedy: bool
    penalties: Penalties | None = None
    # logit_bias as (rows [N], token ids [N], biases [N]); -inf bans a token (min_tokens)
    bias: tuple[Tensor, Tensor, Tensor] | None = None
    min_ps: Tensor | None = None  # [B] float32, 0 = none (None when no row sets min_p)
    # structured outputs (engine.structured): rows [R] int64 and their bitmasks [R, ceil(V / 32)]
    # int32 of the tokens allowed next; the other tokens of those rows get -inf first
    allowed: tuple[Tensor, Tensor] | None = None


def apply_penalties(logits: Tensor, p: Penalties) -> Tensor:
    """logits [B, V] float32 with the OpenAI frequency / presence penalties over the generated
    tokens and the repetition penalty over prompt and generated tokens (a new tensor)."""
    num_seqs, vocab = logits.shape
    counts = torch.zeros(num_seqs, vocab + 1, device=logits.device)  # column V takes the padding
    counts.scatter_add_(1, p.output_ids, torch.ones_like(p.output_ids, dtype=counts.dtype))
    counts = counts[:, :vocab]
    logits = logits - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)
    seen = torch.zeros(num_seqs, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, p.seen_ids, True)
    rep = p.repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    return torch.where(seen[:, :vocab], penalised, logits)


@torch.no_grad()
def sample(logits: Tensor, st: SamplingTensors, default_generator: torch.Generator) -> Tensor:
    """logits [B, V] float32 -> token ids [B] int64."""
    if st.allowed is not None:
        logits = apply_bitmask(logits, *st.allowed)
    if st.penalties is not None:
        logits = apply_penalties(logits, st.penalties)
    if st.bias is not None:
        rows, ids, biases = st.bias
        logits = logits.index_put((rows, ids), biases, accumulate=True)
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy
    scaled = logits / st.temperatures.clamp(min=1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(logits.shape[1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= st.top_ks[:, None], float("-inf"))
    if st.min_ps is not None:
        sorted_logits = apply_min_p(sorted_logits, st.min_ps)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already hold top_p of the mass
    outside = probs.cumsum(dim=-1) - probs > st.top_ps[:, None]
    probs = probs.masked_fill(outside, 0.0)
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    for row, gen in enumerate(st.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    picked = order.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(st.temperatures == 0, greedy, picked)


def apply_min_p(sorted_logits: Tensor, min_ps: Tensor) -> Tensor:
    """Logits [B, V] sorted descending, with the tokens less likely than min_p x the most likely
    one at -inf: p_i < min_p * p_max is l_i < l_max + log(min_p), the same before and after the
    top-k / top-p cuts (neither drops the most likely token)."""
    floor = sorted_logits[:, :1] + min_ps.clamp(min=1e-30).log()[:, None]
    return sorted_logits.masked_fill((sorted_logits < floor) & (min_ps[:, None] > 0), float("-inf"))


@torch.no_grad()
def token_logprobs(logits: Tensor, tokens: Tensor, index: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the sampled tokens of the rows in `index` (None: every row) and of
    their k most likely tokens, under the logits as the model gives them (before penalties, bias
    and temperature: what a client compares across sampling settings). logits [B, V], tokens [B],
    index [R] int64 on their device (made without waiting for it: ModelRunner._tensor) ->
    (values [R, 1 + k] float32: the sampled token's, then the alternatives' in descending order;
    ids [R, k] int64)."""
    if index is not None:
        logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return torch.cat([chosen, top_values], dim=1), top_ids

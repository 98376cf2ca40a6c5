"""SamplingInputs: a step's sampling settings as device tensors, one row per sampled sequence.

Temperatures, top-p / top-k, logit biases and penalty histories become SamplingTensors for
engine.sampler.sample; a seeded sequence keeps its own generator from its first step to its
release, so its draws do not depend on what it was batched with.
"""
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from engine.sampler import Penalties, SamplingTensors
from engine.sequence import Sequence
from engine.structured import fill_bitmask


class SamplingInputs:
    def __init__(self, vocab_size: int, device: torch.device, to_tensor: Callable[[list, torch.dtype], Tensor],
                 eos_token_ids: tuple[int, ...] = ()):
        """to_tensor(values, dtype): a host list as a tensor on `device` (ModelRunner._tensor);
        eos_token_ids: what min_tokens bans with the request's stop_token_ids."""
        self.vocab_size, self.device, self._tensor = vocab_size, device, to_tensor
        self.eos_token_ids = tuple(eos_token_ids)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator
        self.id_masks: dict[int, Tensor] = {}  # seq_id -> its allowed_token_ids' bitmask

    def tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        vocab = self.vocab_size
        temps = [s.params.temperature for s in seqs]
        penalties = self._penalties(seqs) if any(s.params.uses_history for s in seqs) else None
        bias = self._logit_bias(seqs) if any(s.params.logit_bias or _too_short(s) for s in seqs) else None
        allowed = self._allowed(seqs) if any(s.grammar is not None or s.params.allowed_token_ids for s in seqs) else None
        if all(t == 0 for t in temps):  # argmax only: no per-sequence tensors to build and copy
            return SamplingTensors(None, None, None, [], all_greedy=True, penalties=penalties, bias=bias,
                                   allowed=allowed)
        gens = [self._generator(s) for s in seqs]
        min_ps = [s.params.min_p if s.params.temperature > 0 else 0.0 for s in seqs]
        return SamplingTensors(
            temperatures=self._tensor(temps, torch.float32),
            top_ps=self._tensor([s.params.top_p for s in seqs], torch.float32),
            top_ks=self._tensor([min(s.params.top_k or vocab, vocab) for s in seqs], torch.long),
            generators=gens, all_greedy=all(t == 0 for t in temps), penalties=penalties, bias=bias,
            min_ps=self._tensor(min_ps, torch.float32) if any(min_ps) else None, allowed=allowed)

    def _allowed(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor]:
        """The rows of sequences with a structured output constraint or allowed_token_ids, and
        the bitmasks of the tokens they may sample next: what the matcher allows (the engine
        launches such a step only once every token of it is on the host and fed to its matcher)
        and, of those, the allowed ids."""
        rows = [row for row, s in enumerate(seqs) if s.grammar is not None or s.params.allowed_token_ids]
        walks = [i for i, row in enumerate(rows) if seqs[row].grammar is not None]
        if len(walks) == len(rows):
            mask = fill_bitmask([seqs[row].grammar for row in rows], self.vocab_size)
        else:
            mask = torch.full((len(rows), -(-self.vocab_size // 32)), -1, dtype=torch.int32)
            if walks:
                mask[walks] = fill_bitmask([seqs[rows[i]].grammar for i in walks], self.vocab_size)
        for i, row in enumerate(rows):
            seq = seqs[row]
            if seq.params.allowed_token_ids:
                mask[i] &= self._id_mask(seq)
                if seq.grammar is not None and seq.grammar.fault is None and not mask[i].any():
                    seq.grammar.fault = ("allowed_token_ids leave none of the tokens the structured output "
                                         "constraint allows after the output so far (an end of sequence among them?)")
        if walks or self.device.type != "cuda":  # a grammar's step waits for its tokens anyway (waits_for_tokens)
            return self._tensor(rows, torch.long), mask.to(self.device, non_blocking=False)
        # without a grammar the step does not wait: the copy must not make the host wait for the forward
        return self._tensor(rows, torch.long), mask.pin_memory().to(self.device, non_blocking=True)

    def _id_mask(self, seq: Sequence) -> Tensor:
        """The bitmask of a sequence's allowed_token_ids, made at its first step and kept to its release."""
        mask = self.id_masks.get(seq.seq_id)
        if mask is None:
            mask = self.id_masks[seq.seq_id] = id_bitmask(seq.params.allowed_token_ids, self.vocab_size)
        return mask

    def _logit_bias(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor, Tensor]:
        """logit_bias, and -inf on the tokens that would end a sequence still under its
        min_tokens (its stop_token_ids, and EOS unless it ignores EOS)."""
        vocab = self.vocab_size
        entries = [(row, t, b) for row, s in enumerate(seqs) for t, b in (s.params.logit_bias or {}).items()
                   if t < vocab]  # a guard: make_sequence refuses ids past the vocabulary
        for row, s in enumerate(seqs):
            if _too_short(s):
                ends = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(self.eos_token_ids))
                entries += [(row, t, float("-inf")) for t in sorted(ends) if t < vocab]
        rows, ids, biases = zip(*entries) if entries else ((), (), ())
        return (self._tensor(list(rows), torch.long), self._tensor(list(ids), torch.long),
                self._tensor(list(biases), torch.float32))

    def _penalties(self, seqs: list[Sequence]) -> Penalties:
        """Per-sequence penalties and token histories (the engine launches a step with a penalty
        only once every token of it is known on the host: no pending ones)."""
        vocab = self.vocab_size
        pad = lambda rows: [r + [vocab] * (max(map(len, rows), default=0) + 1 - len(r)) for r in rows]  # noqa: E731
        return Penalties(
            frequency=self._tensor([s.params.frequency_penalty for s in seqs], torch.float32),
            presence=self._tensor([s.params.presence_penalty for s in seqs], torch.float32),
            repetition=self._tensor([s.params.repetition_penalty for s in seqs], torch.float32),
            output_ids=self._tensor(pad([s.output_token_ids for s in seqs]), torch.long),
            seen_ids=self._tensor(pad([s.prompt_token_ids + s.output_token_ids for s in seqs]), torch.long))

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed)
        return gen

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.id_masks.pop(seq.seq_id, None)


def _too_short(seq: Sequence) -> bool:
    """Whether the token this step samples for `seq` comes before its min_tokens-th (the
    tokens still on the device, num_pending, count as made)."""
    return len(seq.output_token_ids) + seq.num_pending < seq.params.min_tokens


def id_bitmask(ids: tuple[int, ...], vocab_size: int) -> Tensor:
    """[ceil(V / 32)] int32: bit k of word w set for token 32w + k in ids (fill_bitmask's layout)."""
    words = np.zeros(-(-vocab_size // 32), dtype=np.uint32)
    ids_ = np.asarray([t for t in ids if t < vocab_size], dtype=np.int64)
    np.bitwise_or.at(words, ids_ >> 5, (np.uint32(1) << (ids_ & 31).astype(np.uint32)))
    return torch.from_numpy(words.view(np.int32))

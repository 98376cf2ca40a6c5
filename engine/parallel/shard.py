"""Which part of the model, and of every adapter, one rank of a multi-GPU replica holds.

A replica over N ranks splits attention and the dense projections by heads (tensor parallel,
tp = N), and the experts either by expert (expert parallel, ep = N: each rank holds E/N whole
experts and the (slot, expert) pairs of those experts) or, with ep = 1, each expert's
intermediate dimension by tp. tp = 1 with ep = N keeps attention whole on every rank.

Rank r's pieces are contiguous spans of the global tensors, so the loader reads a checkpoint
slice by slice and an adapter is cut the same way:

| tensor                         | split along                   | combined by                   |
|--------------------------------|-------------------------------|-------------------------------|
| q/k/v weight, bias; LoRA B     | output rows: heads / KV heads | stays split (KV cache too)    |
| o weight; o LoRA A             | input columns: heads          | all-reduce of o's output      |
| o bias                         | rank 0 only (others zero)     | the same all-reduce           |
| experts (ep), their LoRA A, B  | experts                       | all-reduce of the MoE output  |
| experts (tp): gate/up rows,    | intermediate                  | all-reduce of the MoE output  |
|   down columns, LoRA B / A     |                               |                               |
| dense MLP gate/up rows, down   | intermediate                  | all-reduce                    |
| lm_head (or tied embeddings)   | vocabulary rows               | all-gather of the logits      |
| embeddings, norms, router      | kept whole                    |                               |

The LoRA deltas need no collective of their own: q/k/v's A is whole, so each rank's delta is
its heads' rows; o's (and down's, with tp) A is cut along the input, so each rank's delta is a
partial sum that the all-reduce of the base output already adds up.

H = query heads, G = KV heads, Dh = head dim, E = experts, I = expert intermediate, V = vocab.
"""
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor

from engine.errors import InvalidRequestError
from engine.models.spec import ModelSpec


def span(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, count) of part `index` of `total` cut into `parts` of ceil(total / parts) (the
    last one shorter when it does not divide: vocabularies)."""
    size = -(-total // parts)
    start = min(index * size, total)
    return start, min(size, total - start)


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of a replica over max(tp, ep) ranks; `group` is the process group of the
    model's collectives (None for one rank)."""
    rank: int = 0
    tp: int = 1
    ep: int = 1
    group: object = field(default=None, compare=False)

    def __post_init__(self):
        size = max(self.tp, self.ep)
        if self.tp < 1 or self.ep < 1 or self.tp not in (1, size) or self.ep not in (1, size):
            raise InvalidRequestError(
                f"tensor_parallel_size={self.tp} and expert_parallel_size={self.ep}: each must be 1 or "
                "the replica's number of GPUs (the larger of the two)")
        if not 0 <= self.rank < size:
            raise InvalidRequestError(f"rank {self.rank} is outside a replica of {size} ranks")

    @property
    def size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def experts_split(self) -> bool:
        return self.ep > 1

    def check(self, spec: ModelSpec) -> None:
        """Refuse a model this split cannot cut evenly (vocabularies may be uneven)."""
        needs = []
        if self.tp > 1:
            needs += [("num_attention_heads", spec.num_heads, self.tp),
                      ("num_key_value_heads", spec.num_kv_heads, self.tp),
                      ("intermediate_size (dense MLP layers)", spec.intermediate_size if spec.dense_layers else 0,
                       self.tp)]
            if self.ep == 1:
                needs.append(("moe_intermediate_size", spec.moe_intermediate_size, self.tp))
        if self.ep > 1:
            needs.append(("num_experts", spec.num_experts, self.ep))
        bad = [f"{name}={value} is not divisible by {ways}" for name, value, ways in needs if value % ways]
        if bad:
            raise InvalidRequestError(f"cannot split {spec.family} over tensor_parallel_size={self.tp}, "
                                      f"expert_parallel_size={self.ep}: " + "; ".join(bad))

    # ---- spans of this rank ---------------------------------------------------------
    def heads(self, n: int) -> tuple[int, int]:
        """(first, count) of this rank's heads out of n (query or KV)."""
        return span(n, self.tp, self.rank) if self.tp > 1 else (0, n)

    def experts(self, n: int) -> tuple[int, int]:
        return span(n, self.ep, self.rank) if self.ep > 1 else (0, n)

    def expert_inter(self, n: int) -> tuple[int, int]:
        """(first, count) of each expert's intermediate rows this rank holds."""
        return span(n, self.tp, self.rank) if self.tp > 1 and self.ep == 1 else (0, n)

    def dense_inter(self, n: int) -> tuple[int, int]:
        return span(n, self.tp, self.rank) if self.tp > 1 else (0, n)

    def vocab(self, n: int) -> tuple[int, int]:
        return span(n, self.tp, self.rank) if self.tp > 1 else (0, n)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec of this rank's part, for sizing memory (KV heads, experts, intermediates)."""
        return replace(spec, num_heads=self.heads(spec.num_heads)[1], num_kv_heads=self.heads(spec.num_kv_heads)[1],
                       num_experts=self.experts(spec.num_experts)[1],
                       moe_intermediate_size=self.expert_inter(spec.moe_intermediate_size)[1],
                       intermediate_size=self.dense_inter(spec.intermediate_size)[1],
                       top_k=min(spec.top_k, self.experts(spec.num_experts)[1]))

    # ---- collectives --------------------------------------------------------------
    def all_reduce_(self, t: Tensor, across_tp: bool = False) -> Tensor:
        """Sum t over the ranks in place: over all of them, or (across_tp) only when tp splits
        (attention's o and the dense MLP); one rank: t as is."""
        ways = self.tp if across_tp else self.size
        if ways > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_vocab(self, logits: Tensor, vocab_size: int) -> Tensor:
        """[B, this rank's vocabulary span] -> [B, V] on every rank."""
        if self.tp == 1:
            return logits
        width = span(vocab_size, self.tp, 0)[1]
        if logits.shape[1] < width:  # the short last span: pad to a common width for the gather
            logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]))
        parts = [torch.empty_like(logits) for _ in range(self.tp)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :vocab_size]


SINGLE = Shard()

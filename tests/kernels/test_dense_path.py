"""Which path a dense LoRA group takes (kernels.moe.dense_launch.dense_path): the row path only for a
few tokens of padded stacks; the adapter heap's factors take the split path at every size, and the
step's shared layout is made wherever the split path will read it."""
import torch

import kernels
from kernels.moe.dense_launch import DENSE_ROWS_MAX_TOKENS_STACKED, dense_path
from tests.kernels.loop_reference import make_group

RANKS = [[1, 8, 16, 4], [8, 16, 1, 0], [16, 4, 8, 2]]


def _group(heap: bool):
    gen = torch.Generator().manual_seed(3)
    return make_group(gen, 4, 64, (32, 16, 16), RANKS, torch.float32, heap=heap)[1]


def test_padded_stacks_are_stacked_and_the_heap_is_not():
    padded, heap = _group(heap=False), _group(heap=True)
    assert padded.a.stacked and padded.b.stacked
    assert not heap.a.stacked and not heap.b.stacked
    # a projection's views of a group keep its layout's rule
    assert padded.dense(1).a.stacked and padded.dense(1).b.stacked and not heap.dense(1).a.stacked


def test_row_path_only_for_a_few_tokens_of_padded_stacks():
    for t in (1, DENSE_ROWS_MAX_TOKENS_STACKED):
        assert dense_path(t, 3, stacked=True) == "rows"
        assert dense_path(t, 3, stacked=False) == "split"
    assert dense_path(DENSE_ROWS_MAX_TOKENS_STACKED + 1, 3, stacked=True) == "split"


def test_the_step_layout_exists_where_the_split_path_reads_it(monkeypatch):
    monkeypatch.setattr(kernels.moe.ops, "use_triton", lambda _: True)
    slots = torch.tensor([0, 2, -1, 1], dtype=torch.int32)
    assert kernels.dense_lora_layout(slots, 4, stacked=False) is not None
    assert kernels.dense_lora_layout(slots, 4, stacked=True) is None
    many = torch.zeros(DENSE_ROWS_MAX_TOKENS_STACKED + 1, dtype=torch.int32)
    assert kernels.dense_lora_layout(many, 4, stacked=True) is not None

"""moe_align_virtual: compact (slot, expert) layout, checked against a Python model."""
import pytest
import torch

from kernels import moe_align_virtual


def _python_layout(topk_ids, slot_ids, num_experts, bs, expert_major=False):
    """Blocks as lists: [(slot, expert, [rows...]), ...] ordered by slot * E + expert
    (expert_major: by (expert, slot), rows without adapter kept as slot -1)."""
    groups: dict[tuple[int, int], list[int]] = {}
    t, k = topk_ids.shape
    for r in range(t * k):
        s = 0 if slot_ids is None else int(slot_ids[r // k])
        if s >= 0 or expert_major:
            groups.setdefault((s, int(topk_ids[r // k, r % k])), []).append(r)
    blocks = []
    order = (lambda kv: (kv[0][1], kv[0][0])) if expert_major else (lambda kv: kv[0])
    for (s, e), rows in sorted(groups.items(), key=order):
        for i in range(0, len(rows), bs):
            blocks.append((s, e, rows[i:i + bs]))
    return blocks


@pytest.mark.parametrize("t,k,e,num_slots,bs", [(1, 1, 3, 2, 4), (17, 2, 6, 5, 4), (40, 8, 60, 64, 16), (5, 3, 7, None, 2)])
@pytest.mark.parametrize("with_slots,expert_major", [(True, False), (False, False), (True, True)])
def test_layout_matches_python_model(t, k, e, num_slots, bs, with_slots, expert_major):
    gen = torch.Generator().manual_seed(t + k + e)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    slots = None
    if with_slots:
        slots = torch.randint(-1, num_slots or 4, (t,), generator=gen, dtype=torch.int32)
    num_slots = num_slots or (4 if expert_major else None)
    lay = moe_align_virtual(ids, slots, e, bs, num_slots, expert_major=expert_major)
    want = _python_layout(ids, slots, e, bs, expert_major)
    n = int(lay.num_blocks)
    assert n == len(want) <= lay.max_blocks
    for b, (s, ex, rows) in enumerate(want):
        assert (int(lay.block_slot[b]), int(lay.block_expert[b])) == (s, ex)
        got = lay.sorted_ids[b * bs:(b + 1) * bs].tolist()
        assert got == rows + [t * k] * (bs - len(rows))
    assert (lay.block_slot[n:] == -1).all() and (lay.block_expert[n:] == -1).all()
    assert (lay.sorted_ids[n * bs:] == t * k).all()


def test_layout_is_compact_not_slots_times_experts():
    """3 tokens over 1000 slots x 500 experts: blocks only for the pairs present."""
    ids = torch.tensor([[499, 3], [3, 7], [499, 3]], dtype=torch.int32)
    slots = torch.tensor([999, -1, 999], dtype=torch.int32)
    lay = moe_align_virtual(ids, slots, 500, 16, num_slots=1000)
    assert int(lay.num_blocks) == 2
    assert lay.max_blocks <= 7
    assert lay.block_slot[:2].tolist() == [999, 999]
    assert lay.block_expert[:2].tolist() == [3, 499]

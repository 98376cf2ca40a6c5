"""align_multi under TRITON_INTERPRET=1 against the torch alignment and a pure-Python model.

Run as `python -m tests.kernels.align_multi_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1
(test_align_multi.py does so in a subprocess). Prints one JSON object per case: which of the
four layout tensors match each reference bitwise.
"""
import os
import zlib

import torch

from tests.kernels.interp import print_cases

FIELDS = ("sorted_ids", "block_expert", "block_slot", "num_blocks")
# (tokens, top-k, experts, slots or None, block size, chunk rows): rows 1, 3, 17, 133, 1000;
# dense keys (3 experts x 2 slots) and sparse ones (60 experts x 64 slots: several key tiles)
SHAPES = [(1, 1, 3, 2, 16, 256), (3, 1, 60, 64, 16, 256), (17, 1, 3, 2, 64, 16),
          (19, 7, 60, 64, 16, 32), (125, 8, 3, 2, 64, 32), (125, 8, 60, 64, 16, 32),
          (1000, 1, 60, 5, 64, 256), (1000, 1, 3, 2, 16, 16)]
MODES = ("slots", "major", "none")


def case_names() -> list[str]:
    names = [f"t{t}k{k}e{e}s{s}b{bs}c{c}-{mode}" for t, k, e, s, bs, c in SHAPES for mode in MODES]
    return names + ["t125k8e60s64b16c256-dispatch", "t130k8e6s3b16c256-dispatch-int64"]


def python_layout(ids: list[list[int]], slots: list[int] | None, num_experts: int, num_slots: int,
                  bs: int, expert_major: bool, max_blocks: int) -> dict[str, list[int]]:
    """The layout written out in Python: pairs in key order, rows ascending, pads, -1 blocks."""
    top_k = len(ids[0])
    groups: dict[tuple[int, int], list[int]] = {}
    for t, experts in enumerate(ids):
        s = 0 if slots is None else slots[t]
        for k, e in enumerate(experts):
            if s >= 0 or expert_major:
                groups.setdefault((s, e), []).append(t * top_k + k)
    order = sorted(groups, key=(lambda p: (p[1], p[0])) if expert_major else (lambda p: p))
    num_rows = len(ids) * top_k
    sorted_ids, block_expert, block_slot = [], [], []
    for s, e in order:
        rows = groups[(s, e)]
        for i in range(0, len(rows), bs):
            part = rows[i:i + bs]
            sorted_ids += part + [num_rows] * (bs - len(part))
            block_expert.append(e)
            block_slot.append(s)
    num_blocks = len(block_expert)
    pad = max_blocks - num_blocks
    return {"sorted_ids": sorted_ids + [num_rows] * pad * bs, "block_expert": block_expert + [-1] * pad,
            "block_slot": block_slot + [-1] * pad, "num_blocks": [num_blocks]}


def _inputs(name: str):
    shape = name.split("-")[0]
    t, k, e, s, bs, c = (int(v) for v in shape[1:].replace("k", " ").replace("e", " ").replace(
        "s", " ").replace("b", " ").replace("c", " ").split())
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    slots = torch.randint(-1, s, (t,), generator=gen, dtype=torch.int32)
    if "none" in name:
        slots = None
    if "int64" in name:
        ids, slots = ids.long(), slots.long()
    return ids, slots, e, s, bs, c


def run_case(name: str) -> dict:
    from kernels.moe.align import moe_align_virtual
    from kernels.moe.align_multi import KeySpace, align_multi
    ids, slots, e, s, bs, chunk = _inputs(name)
    major = "major" in name
    os.environ["MOEPLEX_TRITON"] = "0"
    torch_lay = moe_align_virtual(ids, slots, e, bs, s, expert_major=major)
    os.environ["MOEPLEX_TRITON"] = "1"
    if "dispatch" in name:
        lay = moe_align_virtual(ids, slots, e, bs, s, expert_major=major)
        got = [getattr(lay, f) for f in FIELDS]
    else:
        space = KeySpace(e, s if slots is not None else 1, slots is not None, major)
        got = list(align_multi(ids, slots, space, bs, torch_lay.max_blocks, chunk=chunk))
    want = python_layout(ids.tolist(), None if slots is None else slots.tolist(), e, s, bs, major,
                         torch_lay.max_blocks)
    return {"vs_torch": [torch.equal(g, getattr(torch_lay, f)) for g, f in zip(got, FIELDS)],
            "vs_python": [g.tolist() == want[f] for g, f in zip(got, FIELDS)],
            "dtypes": [str(g.dtype) for g in got], "num_blocks": want["num_blocks"][0]}


def main() -> None:
    print_cases(case_names(), run_case)


if __name__ == "__main__":
    main()

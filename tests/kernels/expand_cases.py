"""lora_expand (kernels/moe/expand.py) under TRITON_INTERPRET=1 against an fp64 per-row loop.

Run as `python -m tests.kernels.expand_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1
(test_expand.py does so in a subprocess). Prints one JSON object per case. Case name:
dtype-projection-spread[-option...]; options: scale (routing weights), prefetch, partsP, bnN
(block_n, default 32), major (expert-major layout: blocks of rows without an adapter),
strided (c a column slice, shrunk column-major), rank0 (one slot of rank 0), many (T = 40 on
3 experts: pairs of several blocks), real (the GPU tests: qwen3's N, 64 tokens, top-8 of 128).
"""
import zlib

import torch

from tests.kernels.interp import print_cases
from tests.kernels.loop_reference import make_slot_ids, rel_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bf16: GPU only
TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}  # delta vs fp64, relative
RANKS = [1, 8, 16, 5]  # R = 16; 5 is not a whole 8-rank group: its reads past r_s are zeroed
SPLIT_N = {"gateup": (2, 40), "down": (1, 24)}  # projection -> (splits, N per split)


def case_names() -> list[str]:
    return [
        "fp32-gateup-uniform", "fp16-gateup-uniform", "fp32-down-zipf-scale", "fp16-down-skewed-scale",
        "fp16-gateup-identical-many-prefetch", "fp32-down-distinct-scale-parts3",
        "fp16-gateup-uniform-parts2-prefetch", "fp32-gateup-uniform-major", "fp16-down-uniform-major-scale",
        "fp16-down-uniform-strided-scale", "fp32-gateup-zipf-strided", "fp32-down-uniform-scale-rank0",
        "fp16-gateup-uniform-bn128", "fp32-down-identical-many-scale-bn16-prefetch",
    ]


def build(name: str, device: str = "cpu") -> dict:
    """Random inputs of a case: routing, slots, layout, shrunk (NaN in its unread columns),
    B (NaN in padded ranks), c, scale; and the keyword arguments of lora_expand."""
    from kernels import moe_align_virtual
    dtype_name, proj, spread, *opts = name.split("-")
    dtype = DTYPES[dtype_name]
    splits, n = SPLIT_N[proj]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t, e, k = (64, 128, 8) if "real" in opts else (40, 3, 2) if "many" in opts else (13, 5, 2)
    if "real" in opts:
        n = 768 if splits == 2 else 2048
    ranks = [1, 8, 16, 0] if "rank0" in opts else RANKS
    s, big_r = len(ranks), max(RANKS)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    slots = make_slot_ids(spread, t, s, gen)
    slots[0], slots[-1] = 2, -1  # a rank-16 token and one without an adapter in every case
    rows = t * k
    b = torch.randn(s, e, splits * n, big_r, generator=gen) * 0.5
    shrunk = torch.randn(rows, splits * big_r, generator=gen)
    for slot, r in enumerate(ranks):
        b[slot, :, :, r:] = float("nan")
    row_slot = slots.long().repeat_interleave(k)
    for h in range(splits):  # columns past each row's rank: garbage the kernel must not read
        cols = torch.arange(big_r)[None, :] >= torch.tensor(ranks)[row_slot.clamp(min=0)][:, None]
        shrunk[:, h * big_r:(h + 1) * big_r][cols] = float("nan")
    c = torch.randn(rows, splits * n, generator=gen).to(dtype)
    if "strided" in opts:
        wide = torch.randn(rows, splits * n + 7, generator=gen).to(dtype)
        wide[:, 3:3 + splits * n] = c
        c = wide[:, 3:3 + splits * n]
        shrunk = shrunk.t().contiguous().t()  # column-major
    major = "major" in opts
    ids, slots, shrunk, b, c = (z.to(device) for z in (ids, slots, shrunk, b, c))
    layout = moe_align_virtual(ids, slots, e, 16, s, expert_major=major)
    kw = {"splits": splits, "block_n": 32, "prefetch": "prefetch" in opts}
    kw["scale"] = torch.rand(rows, generator=gen).to(device) if "scale" in opts else None
    for opt in opts:
        if opt.startswith("parts"):
            kw["parts"] = int(opt[5:])
        if opt.startswith("bn"):
            kw["block_n"] = int(opt[2:])
    return {"ids": ids, "slots": slots, "layout": layout, "shrunk": shrunk, "b": b.to(dtype), "c": c,
            "ranks": torch.tensor(ranks, dtype=torch.int32, device=device), "kw": kw, "major": major}


def expand_ref64(case: dict, c: torch.Tensor) -> torch.Tensor:
    """fp64 c + delta, row by row from the routing (not from the layout); rank-sliced B."""
    b, shrunk, kw = case["b"], case["shrunk"], case["kw"]
    splits, big_r = kw["splits"], b.shape[3]
    n = b.shape[2] // splits
    out = c.double().clone()
    top_k = case["ids"].shape[1]
    for t, slot in enumerate(case["slots"].tolist()):
        if slot < 0:
            continue
        r = int(case["ranks"][slot])
        for kk in range(top_k):
            row, e = t * top_k + kk, int(case["ids"][t, kk])
            for h in range(splits):
                a = shrunk[row, h * big_r:h * big_r + r].to(b.dtype).double()  # the kernel's cast
                delta = b[slot, e, h * n:(h + 1) * n, :r].double() @ a
                if kw["scale"] is not None:
                    delta = delta * float(kw["scale"][row])
                out[row, h * n:(h + 1) * n] += delta
    return out


def untouched_rows(case: dict) -> torch.Tensor:
    """Rows that must stay bitwise equal: tokens without an adapter, slots of rank 0."""
    slot_rank = torch.where(case["slots"] >= 0, case["ranks"][case["slots"].clamp(min=0).long()], 0)
    return (slot_rank == 0).repeat_interleave(case["ids"].shape[1])


def check(case: dict, got: torch.Tensor, before: torch.Tensor, dtype_name: str) -> dict:
    want = expand_ref64(case, before)
    keep = untouched_rows(case)
    return {"err": rel_err(got[~keep] - before[~keep].double(), want[~keep] - before[~keep].double()),
            "bitwise": bool(torch.equal(got[keep], before[keep])), "finite": bool(torch.isfinite(got).all()),
            "tol": TOL[dtype_name]}


def tiles_expand(case: dict, c: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """The same expand through lora_expand_tiles' (block, n-tile) grid, on c in place (not for
    expert-major layouts: it reads ranks[-1] on blocks of slot -1)."""
    from kernels.moe.grouped_gemm import lora_expand_tiles
    kw = case["kw"]
    splits, big_r = kw["splits"], case["b"].shape[3]
    n = case["b"].shape[2] // splits
    return lora_expand_tiles(case["shrunk"], case["b"], c, case["layout"], case["ranks"], n=n, k=big_r,
                             splits=splits, scale=kw["scale"], block_k=16, block_n=block_n, num_stages=1)


def run_case(name: str) -> dict:
    from kernels.moe.expand import lora_expand
    case = build(name)
    before = case["c"].clone()
    got = lora_expand(case["shrunk"], case["b"], case["c"], case["layout"], case["ranks"], **case["kw"])
    res = check(case, got, before, name.split("-")[0])
    res["in_place"] = got.data_ptr() == case["c"].data_ptr()
    if not case["major"]:
        # same N tile: the interpreter's dots of other widths may round differently (numpy BLAS)
        res["same_as_tiles"] = bool(torch.equal(got, tiles_expand(case, before.clone(), case["kw"]["block_n"])))
    return res


def main() -> None:
    print_cases(case_names(), run_case)


if __name__ == "__main__":
    main()

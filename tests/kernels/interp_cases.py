"""Triton kernels under TRITON_INTERPRET=1 against the fp64 loop references.

Run as `python -m tests.kernels.interp_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1 in
the environment (test_triton_interpret.py does so in a subprocess, so that the interpreter
setting never leaks into other test modules). Prints one JSON object per case.
"""
import os
import zlib

import torch

from tests.kernels.interp import print_cases
from tests.kernels.loop_reference import (SPREADS, dense_loop_ref, make_dense_lora, make_group, make_moe,
                                          make_moe_lora, make_slot_ids, moe_loop_ref, moe_lora_in_heap,
                                          rel_err, share_outer)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "fp16": 5e-3}  # output vs fp64; the LoRA delta gets 4x this
MOE_SHAPES = [(1, 6, 1), (3, 6, 2), (17, 10, 8)]  # (tokens, experts, top-k)
RANKS = [1, 8, 16, 4]
MIXED_RANKS = [8, 16, 24, 40]


def case_names() -> list[str]:
    names = [f"moe-{dt}-t{t}e{e}k{k}-uniform" for dt in DTYPES for t, e, k in MOE_SHAPES]
    names += [f"moe-fp32-t17e10k2-{sp}" for sp in SPREADS]
    names += ["moe-fp16-t9e6k2-rank64-nanpad"]
    # I = 64 (a multiple of the 64-wide N tile) and one token: the fused base+LoRA launch
    # (asked for by name: at one token the row path is the default)
    names += ["moe-fp32-t17e10k2-uniform-fused", "moe-fp16-t1e10k8-skewed-fused",
              "moe-fp16-t1e6k2-rank64-nanpad-fused", "moe-fp32-t1e6k1-distinct-fused"]
    # these sizes take the row path by default; the (slot, expert) block path of larger batches
    names += ["moe-fp32-t17e10k8-uniform-split", "moe-fp16-t9e6k2-rank64-nanpad-split",
              "moe-fp32-t5e6k2-zipf-strided-split", "moe-fp16-t17e10k8-zipf-split-blocks",
              "moe-fp32-t9e6k2-rank64-nanpad-split-tiles"]
    # hidden a column slice of a wider tensor, int64 routing ids (as torch.topk returns them)
    names += ["moe-fp32-t5e6k2-zipf-strided"]
    names += [f"dense-{dt}-{sp}" for dt in DTYPES for sp in ("uniform", "zipf")]
    # padded stacks: 6 tokens ("t6") take the row path by default (DENSE_ROWS_MAX_TOKENS_STACKED), 19-21
    # the split path; "rows" asks for the row path (heap factors take the split path at every size)
    names += ["dense-fp32-identical-nanpad", "dense-fp16-uniform-t6", "dense-fp32-zipf-rows"]
    # q/k/v as one group. By row: a program per token, projection and column part, sections of
    # any width. By the split path: sections a 16-column tile divides (one shrink + one expand,
    # split over 300 input features), and sections it does not (one projection at a time)
    names += ["group-fp32-uniform-s32x16x16-rows", "group-fp16-zipf-s32x16x16-nanpad-rows",
              "group-fp32-distinct-s36x20x12-rows", "group-fp16-zipf-s36x20x12-nanpad-t6",
              "group-fp32-uniform-s32x16x16", "group-fp16-zipf-s32x16x16-nanpad", "group-fp32-distinct-s36x20x12"]
    # the row launch with 16-wide column tiles cut in 3 parts and 32-deep K tiles: parts that
    # straddle no section, parts past a narrow section's end, several K tiles
    names += ["group-fp16-zipf-s36x20x12-nanpad-tiles", "group-fp32-uniform-s32x16x16-in300-tiles"]
    # 2304 input features in whole 128-wide K tiles: 6 slices where 8 were asked (unwritten
    # partial-sum slices must never be read)
    names += ["group-fp32-zipf-s32x16x16-in2304"]
    # the engine's adapter heap: each slot at its own rank (experts as padded slots at the rank
    # rounded up to 16, attention rank-major), NaN around every slot and past every slot's rank
    names += ["moe-fp32-t17e10k8-uniform-heap", "moe-fp16-t9e6k2-rank64-heap-split",
              "moe-fp32-t9e6k2-rank64-heap-split-tiles", "moe-fp16-t17e10k8-zipf-heap-split-blocks",
              "moe-fp16-t1e6k2-rank64-heap-fused",
              "group-fp32-uniform-s32x16x16-heap", "group-fp16-zipf-s36x20x12-heap-rows",
              "group-fp32-distinct-s36x20x12-heap"]
    # ranks 8, 16, 24, 40 in one heap: r16 of 16, 16, 32, 48 (the last past R = 40), every path
    names += ["moe-fp32-t17e10k8-uniform-mixed-heap", "moe-fp16-t17e10k8-zipf-mixed-heap",
              "moe-fp16-t9e6k2-distinct-mixed-heap-split", "moe-fp32-t9e6k2-uniform-mixed-heap-split-tiles",
              "moe-fp16-t17e10k8-skewed-mixed-heap-split-blocks", "moe-fp32-t1e6k2-distinct-mixed-heap-fused",
              "moe-fp16-t1e10k8-skewed-mixed-heap-fused"]
    # the same heap with ranks rounded up to 8 (the factors' RANK_UNIT_8 bit: 8, 16, 24, 40 as
    # they are), every path, and with shared-outer slots
    names += ["moe-fp32-t17e10k8-uniform-mixed-heap-u8", "moe-fp16-t9e6k2-distinct-mixed-heap-u8-split",
              "moe-fp32-t9e6k2-uniform-mixed-heap-u8-split-tiles", "moe-fp16-t17e10k8-skewed-mixed-heap-u8-split-blocks",
              "moe-fp32-t1e6k2-distinct-mixed-heap-u8-fused", "moe-fp32-t17e10k8-uniform-mixed-shared-heap-u8"]
    # slots 1 and 3 shared-outer (gate/up A and down B once, expert 0's) among per-expert slots
    # of mixed ranks, every path; NaN wherever another expert's copy would have been
    # (the split path runs those slots' gate/up shrink and down expand once a token:
    # MoELoRAWeights.shared_halves; "flagged": that path on over a heap without shared slots)
    names += ["moe-fp16-t17e10k8-zipf-mixed-heap-flagged-split", "moe-fp32-t9e6k2-uniform-mixed-heap-flagged-split-tiles",
              "moe-fp32-t17e10k8-uniform-mixed-shared-heap-split", "moe-fp16-t9e6k2-zipf-mixed-shared-heap-u8-split-blocks"]
    names += ["moe-fp32-t17e10k8-uniform-mixed-shared-heap", "moe-fp16-t9e6k2-zipf-shared-heap",
              "moe-fp16-t17e10k8-distinct-mixed-shared-heap-split",
              "moe-fp32-t9e6k2-uniform-mixed-shared-heap-split-tiles",
              "moe-fp16-t17e10k8-skewed-shared-heap-split-blocks", "moe-fp32-t1e6k2-distinct-mixed-shared-heap-fused"]
    # the down delta by its own row launch (path "rows-apart", the row path before the down fold)
    names += ["moe-fp16-t17e10k8-zipf-mixed-heap-apart", "moe-fp32-t9e6k2-rank64-nanpad-apart"]
    # the gate/up delta added into gate_up in place (path "rows-inplace", the A/B baseline of the
    # rank slices the activation adds)
    names += ["moe-fp16-t17e10k8-zipf-mixed-heap-inplace", "moe-fp32-t9e6k2-rank64-nanpad-inplace"]
    # the gate/up delta by rank slices the activation adds (path "rows"): mixed ranks on the heap
    # (ranks 8 / 16 / 24 / 40: slices of 16 in a pool of R = 40), rank unit 8, shared-outer slots,
    # NaN padding past every rank, and the down fold's wide tiles
    names += ["moe-fp32-t17e10k8-uniform-mixed-heap-into", "moe-fp16-t17e10k8-zipf-mixed-heap-u8-into",
              "moe-fp32-t17e10k8-uniform-mixed-shared-heap-into", "moe-fp32-t9e6k2-rank64-nanpad-into",
              "moe-fp16-t5e6k2-rank64-nanpad-wide-into", "moe-fp16-t1e10k8-skewed-mixed-heap-into"]
    # one token takes the rank slices by default (launch.ROWS_ONE_TOKEN): with shared-outer slots,
    # and a token with no adapter ("bare": slot -1), bitwise the base
    names += ["moe-fp32-t1e6k2-distinct-mixed-shared-heap", "moe-fp16-t1e10k8-skewed-mixed-heap-bare"]
    # D = 200 and I = 1100 ("wide"): the down fold's activation walks I in several tiles and the
    # top-k sum D in several blocks (narrower ones for the rank-64 pool)
    names += ["moe-fp32-t5e6k2-rank64-nanpad-wide", "moe-fp16-t5e6k2-uniform-wide"]
    # tiles other than the defaults, as sweeps pass them: the down fold's activation in 16-column
    # tiles and its top-k sum in 16-column blocks, other warps; the dense split path in 2 K slices
    # of 32-deep tiles and 16-wide expand tiles
    # the split path's expand by blocks with each block's columns cut in parts (16-wide tiles, one
    # tile of a split a part: gate/up's 3 tiles a split in 2 parts of 3 of its 6, down's 2 in 2 parts
    # of 1) and its shrinks at the long-K tiles (256 deep, past K)
    names += ["moe-fp16-t17e10k8-zipf-mixed-heap-cut-split-blocks", "moe-fp32-t9e6k2-rank64-nanpad-cut-split-blocks",
              "moe-fp32-t17e10k8-uniform-mixed-shared-heap-cut-split-blocks"]
    # the base GEMMs' tiles walked by groups of 3 blocks (the last group short): the same outputs,
    # bit for bit, as block by block
    names += ["moe-fp32-t17e10k8-uniform-grouped", "moe-fp16-t9e6k2-rank64-nanpad-grouped-split-blocks"]
    names += ["moe-fp16-t17e10k8-zipf-mixed-heap-swept", "moe-fp32-t5e6k2-rank64-nanpad-wide-swept",
              "group-fp32-zipf-s32x16x16-swept", "group-fp16-uniform-s32x16x16-nanpad-heap-swept"]
    names += ["align-slots-t1e3k1", "align-slots-t37e60k8", "align-none-t29e7k2", "align-slots-t5e1k1", "align-major-t37e60k8", "align-major-t3e5k2"]
    return names


def _parse(name: str) -> dict:
    parts = name.split("-")
    return {"kind": parts[0], "dtype": parts[1], "shape": parts[2], "rest": parts[3:]}


def run_moe(name: str) -> dict:
    p = _parse(name)
    t, rest = p["shape"][1:].split("e")
    e, k = rest.split("k")
    t, e, k = int(t), int(e), int(k)
    dtype = DTYPES[p["dtype"]]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    ranks = [1, 8, 64, 16] if "rank64" in p["rest"] else MIXED_RANKS if "mixed" in p["rest"] else RANKS
    pad = float("nan") if "nanpad" in p["rest"] else 0.0
    spread = p["rest"][0] if p["rest"][0] in SPREADS else "skewed"
    d, inter = (200, 1100) if "wide" in p["rest"] else (32, 64 if "fused" in p["rest"] else 48)
    args = make_moe(gen, t, d, inter, e, k, dtype)
    if "strided" in p["rest"]:
        wide = torch.randn(t, 2 * d, dtype=dtype, generator=gen)
        wide[:, 3:3 + d] = args[0]
        args = (wide[:, 3:3 + d], *args[1:4], args[4].long())
    lora = make_moe_lora(gen, len(ranks), e, d, inter, ranks, dtype, pad=pad)
    shared = (1, 3) if "shared" in p["rest"] else ()
    if shared:
        lora = share_outer(lora, shared)
    if "heap" in p["rest"]:
        lora = moe_lora_in_heap(lora, shared, 8 if "u8" in p["rest"] else 16)
        lora.shared_halves |= "flagged" in p["rest"]
    slots = make_slot_ids(spread, t, len(ranks), gen)
    slots[0] = 1  # at least one token with an adapter
    if "bare" in p["rest"]:
        slots.fill_(-1)  # none: the base output, bit for bit
    import kernels
    from kernels.moe.launch import fused_moe_triton
    base = kernels.fused_moe(*args)
    path = next((opt for opt in p["rest"] if opt in ("fused", "split")), "auto")
    if path == "split" and p["rest"][-1] in ("tiles", "blocks"):
        path = f"split-{p['rest'][-1]}"
    if "apart" in p["rest"]:
        path = "rows-apart"
    if "inplace" in p["rest"]:
        path = "rows-inplace"
    if "into" in p["rest"]:
        path = "rows"
    if path == "fused" and t > 1:
        path = "auto"  # the fused launch takes one token; with more, the default path
    from kernels.moe import down_fold, launch
    tiles = (down_fold.SHRINK_TILE, down_fold.TOPK_SUM_TILE, down_fold.SHRINK_WARPS, down_fold.TOPK_SUM_WARPS)
    split_tiles = (launch.EXPAND_BLOCKS, launch.EXPAND_BLOCKS_TILES_A_PART, launch.SHRINK_LONG_K)
    base_group_m = launch._base_group_m
    if "swept" in p["rest"]:
        down_fold.SHRINK_TILE, down_fold.TOPK_SUM_TILE, down_fold.SHRINK_WARPS, down_fold.TOPK_SUM_WARPS = 256, 256, 8, 2
    if "cut" in p["rest"]:
        launch.EXPAND_BLOCKS, launch.EXPAND_BLOCKS_TILES_A_PART, launch.SHRINK_LONG_K = (
            {**launch.EXPAND_BLOCKS, "block_n": 16}, 1, 16)
    try:
        if "grouped" in p["rest"]:
            launch._base_group_m = lambda block_m, n, block_n: 3
            base = kernels.fused_moe(*args)
        got = fused_moe_triton(*args, lora=lora, slot_ids=slots, path=path)
    finally:  # later cases run the defaults
        down_fold.SHRINK_TILE, down_fold.TOPK_SUM_TILE, down_fold.SHRINK_WARPS, down_fold.TOPK_SUM_WARPS = tiles
        launch.EXPAND_BLOCKS, launch.EXPAND_BLOCKS_TILES_A_PART, launch.SHRINK_LONG_K = split_tiles
        launch._base_group_m = base_group_m
    want_base = moe_loop_ref(*args)
    want = moe_loop_ref(*args, lora, slots)
    none = slots < 0
    return {"err": rel_err(got, want), "base_err": rel_err(base, want_base),
            "delta_err": rel_err(got.double() - base.double(), want - want_base),
            "bitwise": bool(torch.equal(got[none], base[none])),
            "same_ungrouped": "grouped" not in p["rest"] or bool(torch.equal(base, kernels.fused_moe(*args))),
            "finite": bool(torch.isfinite(got).all()), "tol": TOL[p["dtype"]]}


def run_dense(name: str) -> dict:
    p = _parse(name)
    dtype = DTYPES[p["dtype"]]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    pad = float("nan") if "nanpad" in p["rest"] else 0.0
    t, n_in, n_out = 6 if "t6" in p["rest"] else 21, 40, 36
    x = torch.randn(t, n_in, generator=gen).to(dtype)
    out = torch.randn(t, n_out, generator=gen).to(dtype)
    lora = make_dense_lora(gen, 4, n_in, n_out, RANKS, dtype, pad=pad)
    slots = make_slot_ids(p["shape"], t, 4, gen)
    slots[0] = 2
    want = dense_loop_ref(x, out, lora, slots)
    before = out.clone()
    import kernels
    from kernels.moe.dense_launch import dense_group_triton_, dense_layout
    shared = before.clone()  # a layout computed once per step, as the attention projections share it
    if "rows" in p["rest"]:
        group = kernels.DenseLoRAGroup.of(lora)
        dense_group_triton_(x, out, group, slots, path="rows")
        dense_group_triton_(x, shared, group, slots, dense_layout(slots, 4), path="rows")
    else:
        kernels.lora_linear_(x, out, lora, slots)
        kernels.lora_linear_(x, shared, lora, slots, kernels.dense_lora_layout(slots, 4))
    none = slots < 0
    return {"err": rel_err(out, want), "base_err": 0.0, "same_with_layout": bool(torch.equal(shared, out)),
            "delta_err": rel_err(out.double() - before.double(), want - before.double()),
            "bitwise": bool(torch.equal(out[none], before[none])),
            "finite": bool(torch.isfinite(out).all()), "tol": TOL[p["dtype"]]}


def run_group(name: str) -> dict:
    """lora_group_linear_ over q/k/v-like sections against the fp64 loop, projection by projection."""
    p = _parse(name)
    dtype = DTYPES[p["dtype"]]
    spread = p["shape"]
    sections = tuple(int(n) for n in p["rest"][0][1:].split("x"))
    pad = float("nan") if "nanpad" in p["rest"] else 0.0
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    t = 6 if "t6" in p["rest"] else 19
    n_in = next((int(w[2:]) for w in p["rest"] if w.startswith("in")), 300)
    # per projection and slot ranks, one projection left alone (rank 0) by slot 3
    ranks = [[1, 8, 16, 4], [8, 16, 1, 0], [16, 4, 8, 2]]
    parts, group = make_group(gen, 4, n_in, sections, ranks, dtype, pad=pad, heap="heap" in p["rest"])
    import kernels
    x = torch.randn(t, n_in, generator=gen).to(dtype)
    out = torch.randn(t, sum(sections), generator=gen).to(dtype)
    slots = make_slot_ids(spread, t, 4, gen)
    slots[0], slots[1] = 3, 1
    offs = [sum(sections[:h]) for h in range(len(sections) + 1)]
    want = torch.cat([dense_loop_ref(x, out[:, offs[h]:offs[h + 1]], parts[h], slots)
                      for h in range(len(sections))], 1)
    before = out.clone()
    empty = torch.empty

    def poisoned(*args, **kw):  # float scratch starts NaN: a read of an unwritten part shows
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    from kernels.moe.lora_rows import lora_group_rows_
    from kernels.moe.dense_launch import dense_group_triton_
    torch.empty = poisoned
    try:
        if "tiles" in p["rest"]:
            lora_group_rows_(x, out, group, slots, parts=3, block_n=16, block_k=32)
        elif "swept" in p["rest"]:
            from kernels.moe.dense_launch import dense_layout, lora_group_triton_
            lora_group_triton_(x, out, group, dense_layout(slots, 4), k_splits=2,
                               shrink={"block_k": 32, "num_warps": 4}, expand={"block_n": 16, "num_warps": 8})
        elif "rows" in p["rest"]:
            dense_group_triton_(x, out, group, slots, path="rows")
        else:
            kernels.lora_group_linear_(x, out, group, slots)
    finally:
        torch.empty = empty
    none = slots < 0
    return {"err": rel_err(out, want), "base_err": 0.0,
            "delta_err": rel_err(out.double() - before.double(), want - before.double()),
            "bitwise": bool(torch.equal(out[none], before[none])),
            "finite": bool(torch.isfinite(out).all()), "tol": TOL[p["dtype"]]}


def run_align(name: str) -> dict:
    """Triton single-program alignment equals the torch alignment, tensor for tensor."""
    p = _parse(name)
    t, rest = p["shape"][1:].split("e")
    e, k = (int(z) for z in rest.split("k"))
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(int(t))]).to(torch.int32)
    slots = None if p["dtype"] == "none" else torch.randint(-1, 5, (int(t),), generator=gen, dtype=torch.int32)
    from kernels import moe_align_virtual
    major = p["dtype"] == "major"
    got = moe_align_virtual(ids, slots, e, 4, 5, expert_major=major)
    os.environ["MOEPLEX_TRITON"] = "0"
    want = moe_align_virtual(ids, slots, e, 4, 5, expert_major=major)
    os.environ["MOEPLEX_TRITON"] = "1"
    same = all(torch.equal(getattr(got, f), getattr(want, f))
               for f in ("sorted_ids", "block_expert", "block_slot", "num_blocks"))
    return {"err": 0.0 if same else 1.0, "base_err": 0.0, "delta_err": 0.0, "bitwise": same,
            "finite": True, "tol": 0.0}


def main() -> None:
    runners = {"moe": run_moe, "dense": run_dense, "group": run_group, "align": run_align}
    print_cases(case_names(), lambda name: runners[name.split("-")[0]](name))


if __name__ == "__main__":
    main()

"""The fused dense launch (kernels/moe/dense_gemm.py: base GEMM, shrink and expand of a q/k/v-like
group in one grid) under TRITON_INTERPRET=1, against the fp64 loop.

Run as `python -m tests.kernels.dense_gemm_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1
(test_dense_gemm.py does so in a subprocess). Prints one JSON object per case.

Case names: {dtype}-{spread}-s{sections}-t{tokens}[-in{K}][-heap][-nanpad][-bias][-k{slices}][-c{lora_k}],
spread one of tests.kernels.loop_reference.SPREADS or "none" (no token has an adapter); lora_k: the
columns of a chunk of slot blocks (FUSED_TILES' lora_k; 16 or 32 make a chunk of one or two blocks,
so that a launch has several chunks).
"""
import zlib

import torch

from tests.kernels.interp import errors_raised, print_cases
from tests.kernels.loop_reference import dense_loop_ref, make_group, make_slot_ids, rel_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "fp16": 5e-3}
# per projection and slot ranks; slot 3 leaves projection 1 alone (rank 0); "wide": ranks past 16,
# so that a rank tile (BLOCK_R) of 64 holds slots of 24 and 40 and the pool's R (40) is under it
RANKS = [[1, 8, 16, 4], [8, 16, 1, 0], [16, 4, 8, 2]]
WIDE_RANKS = [[1, 24, 16, 40], [8, 40, 1, 0], [40, 4, 24, 2]]  # a padded stack wants one max a projection


def case_names() -> list[str]:
    return [
        # q/k/v-like sections, 16-wide tiles (the section ends), one K slice and several
        "fp32-uniform-s32x16x16-t5", "fp16-zipf-s32x16x16-t19-nanpad-bias", "fp32-distinct-s32x16x16-t19-k3",
        # the adapter heap (NaN around and past every slot's rank), 64-wide tiles, K = 300 in 128-deep tiles
        "fp16-uniform-s64x64x64-t19-heap-bias", "fp32-zipf-s128x64x64-t7-heap-k2",
        # o-like (one projection), one token; a full 64-token tile
        "fp32-distinct-s48-t1-nanpad", "fp16-uniform-s32x16x16-t64-in96-nanpad",
        # no token with an adapter: the shrink has no block, the output is the base alone
        "fp32-none-s32x16x16-t6",
        # two projections: the third end past N
        "fp16-zipf-s32x32-t9-in80",
        # chunks of one and of two blocks: several a launch, shared out over K slices; a slot's
        # second block (64 tokens over 4 slots: a slot of more than 16 takes two), in its first
        # block's chunk (c32) and in the next chunk (c16)
        "fp32-distinct-s32x16x16-t19-k3-c16", "fp16-zipf-s64x64x64-t64-in96-heap-nanpad-c32",
        "fp16-zipf-s64x64x64-t64-in96-heap-nanpad-k2-c16",
        # ranks 24 and 40 (heap and padded stack): a 64-wide rank tile, chunks of one block at the default
        # columns
        "fp32-uniform-s64x64x64-t19-heap-nanpad-wide", "fp16-zipf-s128x64x64-t40-in96-wide-k2",
    ]


def _parse(name: str) -> dict:
    words = name.split("-")
    return {"dtype": words[0], "spread": words[1], "sections": tuple(int(n) for n in words[2][1:].split("x")),
            "t": int(words[3][1:]), "in": next((int(w[2:]) for w in words[4:] if w.startswith("in")), 300),
            "slices": next((int(w[1:]) for w in words[4:] if w.startswith("k")), 0),
            "lora_k": next((int(w[1:]) for w in words[4:] if w.startswith("c")), 0), "flags": set(words[4:])}


def build(name: str) -> dict:
    p = _parse(name)
    dtype, sections, t, n_in = DTYPES[p["dtype"]], p["sections"], p["t"], p["in"]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    pad = float("nan") if "nanpad" in p["flags"] else 0.0
    ranks = WIDE_RANKS if "wide" in p["flags"] else RANKS
    parts, group = make_group(gen, 4, n_in, sections, ranks, dtype, pad=pad, heap="heap" in p["flags"])
    x = torch.randn(t, n_in, generator=gen).to(dtype)
    weight = (torch.randn(sum(sections), n_in, generator=gen) / n_in ** 0.5).to(dtype)
    bias = torch.randn(sum(sections), generator=gen).to(dtype) if "bias" in p["flags"] else None
    if p["spread"] == "none":
        slots = torch.full((t,), -1, dtype=torch.int64)
    else:
        slots = make_slot_ids(p["spread"], t, 4, gen)
        slots[0] = 3
        if t > 1:
            slots[-1] = -1
    base = x.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
    offs = [sum(sections[:h]) for h in range(len(sections) + 1)]
    want = torch.cat([dense_loop_ref(x, base[:, offs[h]:offs[h + 1]], parts[h], slots)
                      for h in range(len(sections))], 1)
    return {"p": p, "group": group, "x": x, "weight": weight, "bias": bias, "slots": slots, "base": base,
            "want": want}


def run_case(name: str) -> dict:
    c = build(name)
    p = c["p"]
    from kernels.moe import dense_gemm
    empty = torch.empty

    def poisoned(*args, **kw):  # float scratch starts NaN: a read of an unwritten partial sum shows
        z = empty(*args, **kw)
        return z.fill_(float("nan")) if z.is_floating_point() else z
    torch.empty = poisoned
    try:
        run = lambda group, slots: dense_gemm.dense_lora_gemm(  # noqa: E731
            c["x"], c["weight"], c["bias"], group, slots, None, sections=p["sections"], k_slices_=p["slices"],
            tiles={"lora_k": p["lora_k"]} if p["lora_k"] else None)
        got = run(c["group"], c["slots"])
        again = run(c["group"], c["slots"])
        base_only = run(None, None)
    finally:
        torch.empty = empty
    none = c["slots"] < 0
    return {"err": rel_err(got, c["want"]), "base_err": rel_err(base_only, c["base"]),
            "delta_err": rel_err(got.double() - c["base"], c["want"] - c["base"]) if (~none).any() else 0.0,
            "bitwise": bool(torch.equal(got[none], base_only[none])), "repeatable": bool(torch.equal(got, again)),
            "finite": bool(torch.isfinite(got).all()),
            "counters_zero": int(dense_gemm._sync(got.device).abs().sum()) == 0, "tol": TOL[p["dtype"]]}


def run_dispatch() -> dict:
    """kernels.linear_lora takes the fused launch at decode size when it is switched on (with LoRA
    and without, the same base sums: rows without an adapter equal bit for bit) and cuBLAS with the
    split path (over the step's layout) when off, the default (the same result up to rounding); it leaves groups whose section
    ends are not whole base tiles to cuBLAS; the launcher refuses what it cannot take with a typed
    error."""
    import kernels
    from kernels.moe import dense_gemm
    c = build("fp32-uniform-s64x64x64-t5-in96")
    launches = []
    launcher = dense_gemm.dense_lora_gemm

    def counted(*args, **kw):
        launches.append(args[3] is not None)
        return launcher(*args, **kw)
    was = dense_gemm.ENABLED
    dense_gemm.dense_lora_gemm = counted
    try:
        dense_gemm.ENABLED = False
        off_layout = kernels.dense_lora_layout(c["slots"], 4)  # the heap's rule: the split path's at every size
        split = kernels.linear_lora(c["x"], c["weight"], None, c["group"], c["slots"], off_layout)
        off_launches = list(launches)
        dense_gemm.ENABLED = True
        layout = kernels.dense_lora_layout(c["slots"], 4)
        fused = kernels.linear_lora(c["x"], c["weight"], None, c["group"], c["slots"], layout)
        alone = kernels.linear_lora(c["x"], c["weight"], None, None, None)
        odd = build("fp32-uniform-s32x16x16-t5")  # ends 32 and 48: not whole 64-column tiles
        kernels.linear_lora(odd["x"], odd["weight"], None, odd["group"], odd["slots"], None)
    finally:
        dense_gemm.dense_lora_gemm = launcher
        dense_gemm.ENABLED = was
    direct = launcher(c["x"], c["weight"], None, c["group"], c["slots"], layout)
    big = torch.zeros(dense_gemm.FUSED_MAX_TOKENS + 1, c["x"].shape[1])
    raised = errors_raised([
        lambda: launcher(big, c["weight"], None, None, None, None),
        lambda: launcher(odd["x"][:, :96], torch.zeros(64, 96), None, None, None, None, sections=(36, 16, 12)),
    ], kernels.KernelInputError)
    none = c["slots"] < 0
    return {"fused_is_direct": bool(torch.equal(fused, direct)), "split_err": rel_err(split, c["want"]),
            "fused_err": rel_err(fused, c["want"]), "layout_when_on": layout is not None,
            "layout_when_off": off_layout is not None, "off_launches": off_launches,
            "on_launches": launches[len(off_launches):], "bitwise_on": bool(torch.equal(fused[none], alone[none])),
            "some_without": bool(none.any()), "raised": raised}


def main() -> None:
    print_cases(case_names() + ["dispatch"], lambda name: run_dispatch() if name == "dispatch" else run_case(name))


if __name__ == "__main__":
    main()

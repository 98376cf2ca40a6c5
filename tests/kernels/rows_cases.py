"""lora_rows_ (kernels/moe/lora_rows.py) under TRITON_INTERPRET=1 against an fp64 per-row loop.

Run as `python -m tests.kernels.rows_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1
(test_lora_rows.py does so in a subprocess). Prints one JSON object per case. Case name:
dtype-projection-spread[-option...]; options: partsP (programs a row), bnN / bkN (tiles, default
16 / 32), strided (a and c column slices, int64 routing ids), rank0 (one slot of rank 0), bad
(routing ids and slots out of range: those rows untouched), real (qwen3's sizes, 64 tokens,
top-8 of 128: the GPU tests), r64 (a pool of R = 64 whose slots fall in every rank bucket of the
kernel: 16, 32 and 64), trT (tile_r = T), onebucket (buckets=False: every row at R's tile), into
(the deltas by rank slice into a NaN-filled RowPartials instead of c, summed here as the activation
sums them; slices past a row's rank must stay NaN and c untouched), act (with into, gate/up only:
silu_mul_shrink adds the slices and its act is checked against silu * up of the fp64 gate_up, rows
without slices bit for bit, a -0.0 among them), over (with r64: one slot's rank 72, past R = 64:
the row launch and the activation must clamp it alike).
"""
import zlib

import torch

from tests.kernels.interp import print_cases
from tests.kernels.loop_reference import make_slot_ids, rel_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bf16: GPU only
TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}  # delta vs fp64, relative
RANKS = [1, 8, 16, 5]  # R = 16
RANKS_64 = [1, 8, 16, 17, 32, 33, 64, 5]  # R = 64: rank buckets 16, 32, 64
SHAPES = {"gateup": (2, 40, 36), "down": (1, 36, 40)}  # projection -> (splits, N per split, K)


def case_names() -> list[str]:
    return [
        "fp32-gateup-uniform", "fp16-gateup-zipf", "fp32-down-uniform", "fp16-down-skewed",
        "fp32-down-distinct-parts3", "fp16-gateup-identical-parts2-bn32", "fp32-gateup-uniform-strided",
        "fp16-down-zipf-strided-bk16", "fp32-down-uniform-rank0", "fp32-gateup-uniform-bad",
        "fp32-gateup-uniform-r64", "fp16-down-zipf-r64-parts2", "fp32-down-uniform-r64-tr16",
        "fp16-gateup-skewed-r64-tr32-bn32", "fp32-gateup-zipf-r64-onebucket",
        "fp32-gateup-uniform-into", "fp32-gateup-uniform-r64-into", "fp16-down-zipf-r64-into-parts2",
        "fp32-gateup-uniform-bad-into", "fp16-gateup-skewed-r64-into-bn32-strided", "fp32-down-uniform-rank0-into",
        "fp32-gateup-zipf-r64-into-act", "fp16-gateup-uniform-r64-into-act-parts3",
        "fp32-gateup-uniform-r64-into-act-over",
    ]


def build(name: str, device: str = "cpu") -> dict:
    """Random inputs of a case: routing, slots, a, A and B (NaN in padded ranks), c, scale; and the
    keyword arguments of lora_rows_."""
    dtype_name, proj, spread, *opts = name.split("-")
    dtype = DTYPES[dtype_name]
    splits, n, k_in = SHAPES[proj]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t, e, top_k = (64, 128, 8) if "real" in opts else (13, 5, 2)
    if "real" in opts:
        n, k_in = (768, 2048) if splits == 2 else (2048, 768)
    ranks = [1, 8, 16, 0] if "rank0" in opts else RANKS_64 if "r64" in opts else RANKS
    s, big_r = len(ranks), max(RANKS_64 if "r64" in opts else RANKS)
    if "over" in opts:
        ranks = ranks[:-1] + [big_r + 8]  # past the pool's R: read as R
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(t)]).to(torch.int32)
    slots = make_slot_ids(spread, t, s, gen)
    slots[0], slots[-1] = 2, -1  # a rank-16 token and one without an adapter in every case
    if "r64" in opts:
        slots[1], slots[2], slots[3] = 3, 5, 6  # ranks 17, 33 and 64: every bucket holds a row
    if "over" in opts:
        slots[4] = s - 1
    if "bad" in opts:
        ids[1, 0], ids[2, 1], slots[3] = e, -2, s  # dropped, as the alignment drops them
    rows = t * top_k
    a_row_div = top_k if splits == 2 else 1
    la = torch.randn(s, e, splits * big_r, k_in, generator=gen) * k_in ** -0.5
    lb = torch.randn(s, e, splits * n, big_r, generator=gen) * 0.5
    for slot, r in enumerate(min(r, big_r) for r in ranks):
        for h in range(splits):
            la[slot, :, h * big_r + r:(h + 1) * big_r] = float("nan")
        lb[slot, :, :, r:] = float("nan")
    a = torch.randn(rows // a_row_div, k_in, generator=gen).to(dtype)
    c = torch.randn(rows, splits * n, generator=gen).to(dtype)
    if "strided" in opts:
        wide_a = torch.randn(a.shape[0], k_in + 5, generator=gen).to(dtype)
        wide_a[:, 2:2 + k_in] = a
        wide_c = torch.randn(rows, splits * n + 7, generator=gen).to(dtype)
        wide_c[:, 3:3 + splits * n] = c
        a, c, ids = wide_a[:, 2:2 + k_in], wide_c[:, 3:3 + splits * n], ids.long()
    kw = {"a_row_div": a_row_div, "splits": splits, "block_n": 16, "block_k": 32}
    kw["scale"] = torch.rand(rows, generator=gen).to(device) if proj == "down" else None
    if "onebucket" in opts:
        kw["buckets"] = False
    for opt in opts:
        for prefix, key in (("parts", "parts"), ("bn", "block_n"), ("bk", "block_k"), ("tr", "tile_r")):
            if opt.startswith(prefix) and opt[len(prefix):].isdigit():
                kw[key] = int(opt[len(prefix):])
    to = lambda z: z.to(device)  # noqa: E731
    return {"a": to(a), "c": to(c), "la": to(la.to(dtype)), "lb": to(lb.to(dtype)), "ids": to(ids),
            "slots": to(slots), "ranks": torch.tensor(ranks, dtype=torch.int32, device=device), "kw": kw}


def rows_ref64(case: dict, c: torch.Tensor) -> torch.Tensor:
    """fp64 c + delta, row by row from the routing; rank-sliced A and B, the shrink rounded to
    B's dtype as the kernel does."""
    la, lb, kw = case["la"], case["lb"], case["kw"]
    splits = kw["splits"]
    big_r, n = la.shape[2] // splits, lb.shape[2] // splits
    out = c.double().clone()
    top_k = case["ids"].shape[1]
    for t, slot in enumerate(case["slots"].tolist()):
        r = min(int(case["ranks"][slot]), big_r) if 0 <= slot < la.shape[0] else 0
        for kk in range(top_k if r > 0 else 0):
            row, e = t * top_k + kk, int(case["ids"][t, kk])
            if not 0 <= e < la.shape[1]:
                continue
            x = case["a"][row // kw["a_row_div"]].double()
            for h in range(splits):
                shrunk = (la[slot, e, h * big_r:h * big_r + r].double() @ x).to(lb.dtype).double()
                delta = lb[slot, e, h * n:(h + 1) * n, :r].double() @ shrunk
                if kw["scale"] is not None:
                    delta = delta * float(kw["scale"][row])
                out[row, h * n:(h + 1) * n] += delta
    return out


def check(case: dict, got: torch.Tensor, before: torch.Tensor, dtype_name: str) -> dict:
    want = rows_ref64(case, before)
    keep = (want == before.double()).all(dim=1)  # rows the reference leaves alone
    return {"err": rel_err(got[~keep] - before[~keep].double(), want[~keep] - before[~keep].double()),
            "bitwise": bool(torch.equal(got[keep], before[keep])), "finite": bool(torch.isfinite(got).all()),
            "touched": int((~keep).sum()), "tol": TOL[dtype_name]}


def run_case(name: str) -> dict:
    from kernels.moe.lora_rows import lora_rows_
    case = build(name)
    before = case["c"].clone()
    if "into" in name.split("-"):
        return run_into(name, case, before)
    got = lora_rows_(case["a"], case["c"], case["la"], case["lb"], case["ranks"], case["slots"], case["ids"],
                     **case["kw"])
    res = check(case, got, before, name.split("-")[0])
    res["in_place"] = got.data_ptr() == case["c"].data_ptr()
    return res


def live_slices(case: dict, slice_r: int) -> list[int]:
    """The rank slices each routed row's delta takes (0 for rows left alone)."""
    la, kw = case["la"], case["kw"]
    big_r, top_k = la.shape[2] // kw["splits"], case["ids"].shape[1]
    out = []
    for row, e in enumerate(case["ids"].reshape(-1).tolist()):
        slot = int(case["slots"][row // top_k])
        live = 0 <= slot < la.shape[0] and 0 <= e < la.shape[1]
        out.append(-(-min(int(case["ranks"][slot]), big_r) // slice_r) if live else 0)
    return out


def run_into(name: str, case: dict, before: torch.Tensor) -> dict:
    """lora_rows_ with into: c must stay as it was, slices past a row's rank unwritten (NaN), and
    c + the live slices (fp32, rounded once) must match the fp64 loop; with "act", silu_mul_shrink
    adding the slices must give silu(gate) * up of that loop's gate_up."""
    from kernels.moe.lora_rows import lora_rows_, row_partials
    dtype_name = name.split("-")[0]
    kw, la = case["kw"], case["la"]
    into = row_partials(before.shape[0], before.shape[1], la.shape[2] // kw["splits"], before.device)
    into.buffer.fill_(float("nan"))
    returned = lora_rows_(case["a"], case["c"], la, case["lb"], case["ranks"], case["slots"], case["ids"], **kw,
                          into=into)
    slices = live_slices(case, into.slice_r)
    got = before.clone()
    written, unwritten = [], []
    for row, n in enumerate(slices):
        written.append(into.buffer[row, :n])
        unwritten.append(into.buffer[row, n:])
        if n:
            got[row] = (before[row].float() + into.buffer[row, :n].sum(0)).to(before.dtype)
    res = check(case, got, before, dtype_name)
    res.update(c_untouched=bool(torch.equal(case["c"], before)), slices=max(slices),
               slices_finite=bool(torch.isfinite(torch.cat([w.reshape(-1) for w in written])).all()),
               rest_unwritten=bool(torch.isnan(torch.cat([u.reshape(-1) for u in unwritten])).all()),
               in_place=returned.data_ptr() == case["c"].data_ptr())
    if "act" in name.split("-"):
        case["c_before"] = before
        res.update(act_check(case, into, before, dtype_name))
    return res


def act_check(case: dict, into, before: torch.Tensor, dtype_name: str) -> dict:
    """silu_mul_shrink over c with the slices against silu * up of the fp64 loop's gate_up (rows
    without slices: bit for bit what silu_mul_shrink gives without them, with a -0.0 gate in one,
    which an added 0.0 would turn into +0.0)."""
    from kernels.moe.down_fold import rank_block, silu_mul_shrink
    n = before.shape[1] // 2
    alone = torch.tensor([k == 0 for k in live_slices(case, into.slice_r)])
    before = before.clone()
    before[alone.nonzero()[0, 0], 0] = -0.0
    s, e, big_r = case["la"].shape[0], case["la"].shape[1], case["la"].shape[2] // 2
    gen = torch.Generator().manual_seed(1)
    down_a = (torch.randn(s, e, big_r, n, generator=gen) * n ** -0.5).to(before.dtype)
    shrunk = torch.empty(before.shape[0], rank_block(big_r))
    args = (down_a, case["ranks"], case["slots"], case["ids"])
    act = silu_mul_shrink(before, torch.empty(before.shape[0], n, dtype=before.dtype), shrunk, *args,
                          gate_up_delta=into)
    plain = silu_mul_shrink(before, torch.empty_like(act), shrunk.clone(), *args)
    want_gu = rows_ref64(case, before)
    want = torch.nn.functional.silu(want_gu[:, :n]) * want_gu[:, n:]
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[act.dtype]
    return {"act_err": rel_err(act[~alone].double(), want[~alone]),
            "act_bitwise": bool(torch.equal(act[alone].view(bits), plain[alone].view(bits))),
            "gate_up_untouched": bool(torch.equal(case["c"], case["c_before"]))}


def main() -> None:
    print_cases(case_names(), run_case)


if __name__ == "__main__":
    main()

"""Dense LoRA of an attention layer (q/k/v as one group, then o) on the GPU: the row path
against the split path, next to the base GEMMs and the adapters' bytes floor.

At decode the dense LoRA is latency-bound: a few us of bytes in two to four dependent launches.
Per preset and token count M (n adapters on q/k/v/o, of rank 16 or of --ranks cycled over the
slots, each token on a uniformly drawn adapter, about 1 in 5 on none), it times CUDA-graph replays (median) of
  - the base GEMMs x @ W_qkv.T and attn @ W_o.T (cuBLAS, as the engine runs them);
  - the LoRA of q/k/v + o through each path: "rows" (one launch a group, no alignment) and
    "split" (one alignment a step, shared by every group, plus a shrink and an expand a group);
    the split column counts the alignment once, as a layer of a step of one layer would;
  - up to kernels.moe.dense_gemm.FUSED_MAX_TOKENS, the fused launch (kernels/moe/dense_gemm.py:
    base GEMM, shrink and expand of a group in one grid) for q/k/v + o, with its alignment, and
    the same launch without LoRA ("fused base"), next to "base+LoRA" (cuBLAS plus the path
    dense_path picks: what linear_lora ran before the fused launch);
and prints the LoRA's time against the bytes floor (A and B of the adapters present / the copy
rate measured in the run) and against the base GEMMs. `--sweep` times the row path's tile
configs instead, `--sweep-fused` the fused launch's. Writes JSON with provenance.

    python benchmarks/bench_dense_lora.py [--presets qwen3-30b-a3b] [--tokens 1 8 64] [--out f.json]
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

from kernels import DenseLoRAGroup
from kernels.moe.lora_rows import lora_group_rows_
from kernels.moe.dense_gemm import FUSED_MAX_TOKENS, FUSED_TILES, dense_lora_gemm
from kernels.moe.dense_launch import DENSE_ROWS_TILES, dense_group_triton_, dense_layout, dense_path, dense_row_parts

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from bench_moe_lora import copy_bandwidth, time_graph
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.bench_moe_lora import copy_bandwidth, time_graph
    from benchmarks.provenance import provenance, write_results

PRESETS = {  # hidden, q heads, kv heads, head dim
    "qwen3-30b-a3b": (2048, 32, 4, 128),
    "olmoe": (2048, 16, 16, 128),
    "mixtral": (4096, 32, 8, 128),
}
TOKENS = [1, 8, 32, 64, 128, 256]
RANK = 16
DTYPE = torch.bfloat16


def make_attention(preset: str, n: int, gen: torch.Generator, slot_ranks: tuple[int, ...] = (RANK,),
                   heap: bool = False) -> dict:
    """Base weights and n adapters' q/k/v group and o pool as padded stacks (lora_layout=slots), or
    as the adapter heap lays them (heap=True); slot s has rank slot_ranks[s % len(slot_ranks)] on
    every projection (R = the largest)."""
    hidden, heads, kv, hd = PRESETS[preset]
    sections = (heads * hd, kv * hd, kv * hd)
    rnd = lambda *shape, std: (torch.randn(*shape, generator=gen, device="cuda") * std).to(DTYPE)  # noqa: E731
    r = max(slot_ranks)
    per_slot = [slot_ranks[i % len(slot_ranks)] for i in range(n)]
    ranks = torch.tensor([per_slot] * 3, dtype=torch.int32, device="cuda")
    qkv = DenseLoRAGroup(rnd(n, 3 * r, hidden, std=hidden ** -0.5), rnd(n, sum(sections), r, std=0.05),
                         ranks, sections)
    o = DenseLoRAGroup(rnd(n, r, heads * hd, std=(heads * hd) ** -0.5), rnd(n, hidden, r, std=0.05),
                       ranks[:1].clone(), (hidden,))
    if heap:
        qkv, o = as_heap(qkv), as_heap(o)
    return {"hidden": hidden, "o_in": heads * hd, "qkv": qkv, "o": o,
            "w_qkv": rnd(sum(sections), hidden, std=hidden ** -0.5), "w_o": rnd(hidden, heads * hd, std=0.02)}


def as_heap(group: DenseLoRAGroup) -> DenseLoRAGroup:
    """The same adapters laid out as the engine's adapter heap lays a dense group
    (engine.lora.slots: each projection's A rank-major [r_s, IN], the group's B transposed
    [r_s, N], each slot at its own rank), by the kernel tests' builder, on the group's device."""
    try:
        from tests.kernels.loop_reference import group_in_heap, group_to
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.kernels.loop_reference import group_in_heap, group_to
    from kernels.weights import DenseLoRAWeights
    a, b, r = group.a.padded.cpu(), group.b.padded.cpu(), group.max_rank
    ends = [group.offset(h) for h in range(group.num_projections + 1)]
    parts = [DenseLoRAWeights(a[:, h * r:(h + 1) * r], b[:, ends[h]:ends[h + 1]], group.ranks[h].cpu())
             for h in range(group.num_projections)]
    return group_to(group_in_heap(parts, group.sections), group.a.device)


def floor_us(layer: dict, slots: torch.Tensor, bw: float) -> float:
    """Bytes of A and B (at each adapter's rank) of the adapters the tokens use, over the copy
    rate, in us."""
    present = torch.unique(slots[slots >= 0])
    rank_sum = int(layer["qkv"].ranks[0, present].sum())
    per_rank = sum((g.a.shape[2] * g.a.shape[3] + g.b.shape[2] * g.b.shape[3]) // g.max_rank
                   for g in (layer["qkv"], layer["o"]))
    return rank_sum * per_rank * 2 / bw * 1e6


def run_config(preset: str, layer: dict, m: int, n: int, bw: float, gen: torch.Generator) -> dict:
    x = torch.randn(m, layer["hidden"], generator=gen, device="cuda").to(DTYPE)
    attn = torch.randn(m, layer["o_in"], generator=gen, device="cuda").to(DTYPE)
    draw = torch.randint(0, n, (m,), generator=gen, device="cuda", dtype=torch.int32)
    none = torch.rand(m, generator=gen, device="cuda") < 0.2
    slots = torch.where(none, -1, draw).to(torch.int32)
    qkv_out = x @ layer["w_qkv"].T
    o_out = attn @ layer["w_o"].T
    layout = dense_layout(slots, n)

    def lora(path: str, out_qkv: torch.Tensor, out_o: torch.Tensor, lay=None):
        dense_group_triton_(x, out_qkv, layer["qkv"], slots, lay, path=path)
        dense_group_triton_(attn, out_o, layer["o"], slots, lay, path=path)

    results = {}
    outs = {}
    base_qkv, base_o = qkv_out.clone(), o_out.clone()  # the timed calls add into qkv_out, o_out
    for path in ("rows", "split"):
        lay = layout if path == "split" else None  # the row path takes none
        oq, oo = base_qkv.clone(), base_o.clone()
        lora(path, oq, oo, lay)
        outs[path] = (oq, oo)
        results[f"{path}_us"] = 1e3 * time_graph(lambda p=path, lay=lay: lora(p, qkv_out, o_out, lay))
    results["split_layout_us"] = 1e3 * time_graph(lambda: dense_layout(slots, n))
    results["split_us"] += results["split_layout_us"]
    # the two paths' deltas agree up to bf16 rounding (a sanity check of the timed calls' inputs)
    delta = lambda path, i: outs[path][i].float() - (base_qkv, base_o)[i].float()  # noqa: E731
    diff = max(float((delta("rows", i) - delta("split", i)).abs().max()) for i in range(2))
    scale = max(float(delta("split", i).abs().max()) for i in range(2))
    results["rows_vs_split_delta_rel"] = diff / max(scale, 1e-30)
    results["base_gemms_us"] = 1e3 * time_graph(lambda: (torch.matmul(x, layer["w_qkv"].T, out=qkv_out),
                                                        torch.matmul(attn, layer["w_o"].T, out=o_out)))
    results["floor_us"] = floor_us(layer, slots, bw)
    # what linear_lora ran before the fused launch: cuBLAS, then the path dense_path picks
    results["now_us"] = results["base_gemms_us"] + results[f"{dense_path(m, 3)}_us"]
    if m <= FUSED_MAX_TOKENS:
        fused = lambda group, s, lay: (  # noqa: E731
            dense_lora_gemm(x, layer["w_qkv"], None, group and layer["qkv"], s, lay, sections=layer["qkv"].sections),
            dense_lora_gemm(attn, layer["w_o"], None, group and layer["o"], s, lay))
        results["fused_us"] = 1e3 * time_graph(lambda: fused(True, slots, layout)) + results["split_layout_us"]
        results["fused_base_us"] = 1e3 * time_graph(lambda: fused(None, None, None))
        got = fused(True, slots, layout)
        want = [(base_qkv.float(), base_o.float())[i] + delta("split", i) for i in range(2)]
        results["fused_vs_split_rel"] = max(float((got[i].float() - want[i]).abs().max()) for i in range(2)) / max(
            max(float(w.abs().max()) for w in want), 1e-30)
    return {"preset": preset, "m": m, "n": n, "parts": dense_row_parts(m, 3), **results}


def sweep_fused(layer: dict, n: int, tokens: list[int], gen: torch.Generator) -> list[dict]:
    """The fused launch's tiles for q/k/v and o apart, at each token count, every token on an
    adapter: its base tiles (N tile, K tile, stages in flight: a program an SM leaves room for deep
    pipelines) with LoRA and without, against cuBLAS's base; then the LoRA's chunk columns and
    shrink K tile on the engine's base tiles. FUSED_TILES is the engine's."""
    out = []
    base_tiles = [{**FUSED_TILES, "block_n": bn, "block_k": bk, "num_stages": st}
                  for bn, bk, st in ((64, 128, 3), (64, 128, 4), (64, 128, 5), (64, 64, 6), (64, 64, 8),
                                     (128, 64, 6), (32, 128, 4))]
    configs = base_tiles + [{**FUSED_TILES, "lora_k": lk, "shrink_k": sk}
                            for lk, sk in ((32, 64), (128, 64), (64, 128))]
    for m in tokens:
        x, attn, slots, _, _ = _inputs(layer, m, n, gen)
        lay = dense_layout(slots, n)
        for name, inp, w, group in (("qkv", x, layer["w_qkv"], layer["qkv"]), ("o", attn, layer["w_o"], layer["o"])):
            cublas = 1e3 * time_graph(lambda: inp @ w.T, samples=7)
            for cfg in configs:
                for ks in (0, 2) if cfg in base_tiles else (0,):  # 0: about a program an SM
                    row = {"m": m, "proj": name, **cfg, "k_slices": ks, "cublas_base_us": cublas,
                           "engine": cfg == FUSED_TILES and ks == 0}
                    for key, g, s_ in (("us", group, slots), ("base_us", None, None)):
                        try:
                            row[key] = 1e3 * time_graph(lambda: dense_lora_gemm(
                                inp, w, None, g, s_, lay if g else None, sections=group.sections, tiles=cfg,
                                k_slices_=ks), samples=7)
                        except Exception as e:  # a tile that does not fit (shared memory): recorded, skipped
                            row[key] = None
                            print(f"{name} M={m} {cfg} k_slices={ks}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    out.append(row)
            mine = next(r for r in out if r["m"] == m and r["proj"] == name and r["engine"])
            for key in ("us", "base_us"):
                best = min((r for r in out if r["m"] == m and r["proj"] == name and r[key]), key=lambda r: r[key])
                print(f"M={m} {name} {key}: cuBLAS base {cublas:.1f} us; engine tiles {mine[key]:.1f}; "
                      f"best {best[key]:.1f} "
                      f"{ {k: best[k] for k in ('block_n', 'block_k', 'num_stages', 'lora_k', 'shrink_k', 'k_slices')} }",
                      flush=True)
    return out


def _inputs(layer: dict, m: int, n: int, gen: torch.Generator) -> tuple:
    """A sweep's or a profile's inputs at M tokens: x, attn, slots (each token on one of n
    adapters) and zeroed q/k/v and o outputs."""
    x = torch.randn(m, layer["hidden"], generator=gen, device="cuda").to(DTYPE)
    attn = torch.randn(m, layer["o_in"], generator=gen, device="cuda").to(DTYPE)
    slots = torch.randint(0, n, (m,), generator=gen, device="cuda", dtype=torch.int32)
    out_qkv = torch.zeros(m, sum(layer["qkv"].sections), device="cuda", dtype=DTYPE)
    out_o = torch.zeros(m, layer["hidden"], device="cuda", dtype=DTYPE)
    return x, attn, slots, out_qkv, out_o


def sweep(layer: dict, n: int, tokens: list[int], gen: torch.Generator, mixed: bool = False) -> list[dict]:
    """The row path's tile configs, q/k/v group and o apart, at each token count; with mixed
    ranks (mixed=True) the kernel before rank buckets at today's tiles, then buckets over tile_r,
    and the split path (with its alignment) at the same inputs."""
    rows = []
    if mixed:
        configs = [{**DENSE_ROWS_TILES, "buckets": False, "parts": 0}] + [
            {"block_k": bk, "block_n": bn, "parts": parts, "num_warps": 4, "num_stages": 3, "tile_r": tr}
            for tr in (16, 64) for bk in (256, 512) for bn in (128, 256) for parts in (2, 4, 8)]
    else:
        configs = [{"block_k": bk, "block_n": bn, "parts": parts, "num_warps": warps, "num_stages": 3}
                   for bk, bn, parts, warps in itertools.product((128, 256, 512), (64, 128, 256), (1, 2, 4, 8), (2, 4, 8))]
    for m in tokens:
        x, attn, slots, out_qkv, out_o = _inputs(layer, m, n, gen)
        if mixed:
            lay = dense_layout(slots, n)
            row = {"m": m, "path": "split", "floor_us": floor_us(layer, slots, copy_bandwidth()),
                   "layout_us": 1e3 * time_graph(lambda: dense_layout(slots, n), samples=7)}
            for name, inp, out in (("qkv", x, out_qkv), ("o", attn, out_o)):
                row[f"{name}_us"] = 1e3 * time_graph(
                    lambda g=layer[name], a=inp, c=out: dense_group_triton_(a, c, g, slots, lay, path="split"), samples=7)
            rows.append(row)
            print(row, flush=True)
        for cfg in configs:
            cfg = {**cfg, "parts": cfg["parts"] or dense_row_parts(m, 3)}
            row = {"m": m, **cfg}
            for name, inp, out in (("qkv", x, out_qkv), ("o", attn, out_o)):
                row[f"{name}_us"] = 1e3 * time_graph(
                    lambda g=layer[name], a=inp, c=out: lora_group_rows_(a, c, g, slots, **cfg), samples=7)
            rows.append(row)
            print(row, flush=True)
    return rows


def profile(layer: dict, n: int, tokens: list[int], gen: torch.Generator) -> list[dict]:
    """Device time of each kernel of both paths (q/k/v then o, 20 calls each), per token count."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    out = []
    for m in tokens:
        x, attn, slots, out_qkv, out_o = _inputs(layer, m, n, gen)
        lay = dense_layout(slots, n)
        for path in ("rows", "split"):
            call = lambda: (dense_group_triton_(x, out_qkv, layer["qkv"], slots, lay, path=path),  # noqa: E731
                            dense_group_triton_(attn, out_o, layer["o"], slots, lay, path=path))
            call()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
            kernels = {e.key[:60]: round(e.device_time_total / 20, 2) for e in prof.key_averages()
                       if e.device_time_total > 0}
            out.append({"m": m, "path": path, "us_per_call": kernels})
            print(out[-1], flush=True)
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':<15}{'M':>6}{'n':>4} {'base GEMMs':>10} {'rows':>8} {'split':>8} {'floor':>7} "
          f"{'rows/floor':>10} {'split/rows':>10} {'base+LoRA':>10} {'fused':>8} {'fused base':>10}"
          "  (us; split and fused include the alignment)")
    for r in rows:
        print(f"{r['preset']:<15}{r['m']:>6}{r['n']:>4} {r['base_gemms_us']:>10.1f} {r['rows_us']:>8.1f} "
              f"{r['split_us']:>8.1f} {r['floor_us']:>7.2f} {r['rows_us'] / r['floor_us']:>10.1f} "
              f"{r['split_us'] / r['rows_us']:>10.2f} {r['now_us']:>10.1f} {r.get('fused_us', float('nan')):>8.1f} "
              f"{r.get('fused_base_us', float('nan')):>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--ranks", nargs="*", type=int, default=[RANK], help="adapter ranks cycled over the slots")
    ap.add_argument("--layout", choices=("padded", "heap"), default="padded",
                    help="padded stacks at R (lora_layout=slots) or the adapter heap's (bytes, the default)")
    ap.add_argument("--sweep", action="store_true", help="time the row path's tile configs (first preset), exit")
    ap.add_argument("--profile", action="store_true", help="per-kernel device time of both paths (first preset), exit")
    ap.add_argument("--sweep-fused", action="store_true",
                    help="time the fused base + LoRA launch's tile configs (first preset) against cuBLAS's base, exit")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    record = {"provenance": provenance(sys.argv), "ranks": args.ranks, "adapters": args.adapters, "layout": args.layout,
              "row_tiles": DENSE_ROWS_TILES}
    if args.profile:
        layer = make_attention(args.presets[0], args.adapters, gen, tuple(args.ranks), args.layout == "heap")
        record["profile"] = profile(layer, args.adapters, args.tokens, gen)
        write_results(record, args.out, "dense_lora_profile")
        return
    if args.sweep_fused:
        layer = make_attention(args.presets[0], args.adapters, gen, tuple(args.ranks), args.layout == "heap")
        record["fused_tiles"] = FUSED_TILES
        record["sweep_fused"] = sweep_fused(layer, args.adapters, args.tokens, gen)
        write_results(record, args.out, "dense_fused_sweep")
        return
    if args.sweep:
        layer = make_attention(args.presets[0], args.adapters, gen, tuple(args.ranks), args.layout == "heap")
        record["sweep"] = sweep(layer, args.adapters, args.tokens, gen, mixed=len(set(args.ranks)) > 1)
        write_results(record, args.out, "dense_lora_sweep")
        return
    record["copy_bw_Bps"] = bw = copy_bandwidth()
    rows = []
    for preset in args.presets:
        layer = make_attention(preset, args.adapters, gen, tuple(args.ranks), args.layout == "heap")
        for m in args.tokens:
            rows.append(run_config(preset, layer, m, args.adapters, bw, gen))
            print(rows[-1], flush=True)
    record["configs"] = rows
    write_results(record, args.out, "dense_lora")
    print_table(rows)


if __name__ == "__main__":
    main()

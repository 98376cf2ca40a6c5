"""MoE layer with multi-tenant LoRA on the GPU: base vs per-adapter loop vs virtual experts.

Times CUDA-graph replays (median), compares the LoRA delta with its bytes floor (adapter
bytes of the (slot, expert) pairs touched / device copy bandwidth measured in the same run),
and checks that idle slots cost nothing. Prints a table last and writes JSON with provenance.

    python benchmarks/bench_moe_lora.py --out results.json [--presets qwen3-30b-a3b] [--quick]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels import MoELoRAWeights, fused_moe, moe_align_virtual
from kernels.moe.expand import lora_expand
from kernels.moe.grouped_gemm import lora_expand_tiles, lora_shrink, moe_gemm
from kernels.moe.lora_rows import lora_rows_
from kernels.moe import launch
from kernels.moe.launch import LORA_BLOCK_M, _base_block_m, LORA_PATHS, _row_parts, fused_moe_triton, fused_path_ok, lora_path, moe_with_layouts

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance

PRESETS = {  # hidden D, intermediate I, experts E, top-k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "mixtral": (4096, 14336, 8, 2),
}
TOKENS = [1, 8, 32, 128, 512, 2048]
ADAPTERS = [1, 4, 16, 64]
RANK = 16
DTYPE = torch.bfloat16
BYTES = 2


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times[2:]) * 1e-3)


def time_graph(fn, reps: int = 0, samples: int = 15) -> float:
    """Median ms of one call, from CUDA-graph replays timed with events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    reps = reps or max(1, min(20, round(3.0 / (start.elapsed_time(end) / 3))))  # ~3 ms a sample
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def make_layer(d, inter, e, num_slots, gen, ranks=(RANK,)):
    """Base weights and num_slots adapters as padded stacks of R = max(ranks); slot s has rank
    ranks[s % len(ranks)]."""
    randn = lambda *s, std: (torch.randn(*s, device="cuda", generator=gen) * std).to(DTYPE)  # noqa: E731
    w_gate_up = randn(e, 2 * inter, d, std=d ** -0.5)
    w_down = randn(e, d, inter, std=inter ** -0.5)
    r = max(ranks)
    slot_ranks = torch.tensor([ranks[s % len(ranks)] for s in range(num_slots)], dtype=torch.int32, device="cuda")
    lora = MoELoRAWeights(randn(num_slots, e, 2 * r, d, std=d ** -0.5),
                          randn(num_slots, e, 2 * inter, r, std=0.1),
                          randn(num_slots, e, r, inter, std=inter ** -0.5),
                          randn(num_slots, e, d, r, std=0.1), slot_ranks)
    return w_gate_up, w_down, lora


def make_batch(m, d, e, k, n, gen):
    hidden = torch.randn(m, d, device="cuda", generator=gen).to(DTYPE)
    logits = torch.randn(m, e, device="cuda", generator=gen)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    slot_ids = (torch.arange(m, device="cuda") % n).to(torch.int32)  # round-robin
    return hidden, topk_weights, topk_ids.to(torch.int32), slot_ids


def floors_ms(d, inter, e, topk_ids, slot_ids, bw, ranks=None):
    """Bytes floors (ms) of the base layer and of the LoRA delta (each (slot, expert) pair's factors
    at its slot's rank: `ranks` [slots], RANK for every slot without it)."""
    experts = torch.unique(topk_ids).numel()
    pairs = torch.unique(slot_ids[:, None].long() * e + topk_ids.long())
    rank_sum = pairs.numel() * RANK if ranks is None else int(ranks.long()[pairs // e].sum())
    base_bytes = experts * 3 * inter * d * BYTES
    lora_bytes = rank_sum * (2 * d + 2 * inter + inter + d) * BYTES
    return base_bytes / bw * 1e3, lora_bytes / bw * 1e3


def per_adapter_loop(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids, n):
    """Conventional path: one alignment and one shrink/expand pair per adapter and projection."""
    e = w_down.shape[0]
    vlays = [moe_align_virtual(topk_ids, torch.where(slot_ids == s, slot_ids, -1), e,
                               LORA_BLOCK_M, lora.num_slots) for s in range(n)]
    return moe_with_layouts(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, vlays)


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()).clamp_min(1e-30))


def path_ratios(hidden, w_gate_up, w_down, tw, ids, lora, slots, base_ms, paths, deltas):
    """virtual / base of each named LoRA path (kernels.moe.launch.LORA_PATHS) at this size, and
    each path's delta error against the per-adapter loop's (deltas = (base output, the loop's
    output)): {path: ratio}, {path: error}."""
    m, inter = hidden.shape[0], w_down.shape[2]
    out, errs = {}, {}
    for path in paths:
        if path == "fused" and not fused_path_ok(m, inter):
            continue
        fn = lambda: fused_moe_triton(hidden, w_gate_up, w_down, tw, ids, lora, slots, path=path)  # noqa: E731
        errs[path] = rel(fn() - deltas[0], deltas[1] - deltas[0])
        out[path] = time_graph(fn) / base_ms
    return out, errs


def run_config(preset, layer, m, n, bw, gen, paths=()):
    d, inter, e, k = PRESETS[preset]
    w_gate_up, w_down, lora = layer
    hidden, tw, ids, slots = make_batch(m, d, e, k, n, gen)
    base = lambda: fused_moe(hidden, w_gate_up, w_down, tw, ids)  # noqa: E731
    virt = lambda: fused_moe(hidden, w_gate_up, w_down, tw, ids, lora, slots)  # noqa: E731
    loop = lambda: per_adapter_loop(hidden, w_gate_up, w_down, tw, ids, lora, slots, n)  # noqa: E731
    out_base, out_virt, out_loop = base(), virt(), loop()
    base_ms, virt_ms, loop_ms = time_graph(base), time_graph(virt), time_graph(loop)
    base_floor, lora_floor = floors_ms(d, inter, e, ids, slots, bw, lora.ranks)
    ratios, errs = path_ratios(hidden, w_gate_up, w_down, tw, ids, lora, slots, base_ms, paths, (out_base, out_loop))
    return {
        "preset": preset, "M": m, "n": n, "slots": lora.num_slots, "ranks": sorted(set(lora.ranks.tolist())),
        "base_ms": base_ms,
        "virt_path": lora_path(m, k, inter), "path_ratios": ratios, "path_delta_errs": errs,
        "loop_ms": loop_ms, "virt_ms": virt_ms, "loop_ratio": loop_ms / base_ms,
        "virt_ratio": virt_ms / base_ms, "floor_ratio": (base_ms + lora_floor) / base_ms,
        "base_floor_ms": base_floor, "base_bw_frac": base_floor / base_ms,
        "delta_ms": virt_ms - base_ms, "delta_floor_ms": lora_floor,
        "delta_over_floor": (virt_ms - base_ms) / lora_floor,
        "delta_rel_err_vs_loop": rel(out_virt - out_base, out_loop - out_base),
    }


def shared_outer(gen, tokens=(512, 2048), n=16):
    """virtual / base on the adapter heap's layout (qwen3, n rank-16 adapters): per-expert
    adapters; the same weights as shared-outer ones (gate/up A and down B one matrix a layer),
    with MoELoRAWeights.shared_halves off (every routed row its own shrink and expand) and on
    (once a token above decode size), in one run."""
    try:  # the heap builders the kernel tests use (as benchmarks/compare_sass.py does)
        from tests.kernels.loop_reference import moe_lora_in_heap, moe_lora_to, share_outer
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.kernels.loop_reference import moe_lora_in_heap, moe_lora_to, share_outer
    d, inter, e, k = PRESETS["qwen3-30b-a3b"]
    w_gate_up, w_down, lora = make_layer(d, inter, e, n, gen)
    dev = w_gate_up.device
    padded = MoELoRAWeights(*(f.padded.cpu() for f in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b)),
                            lora.ranks.cpu())
    every = tuple(range(n))
    on = moe_lora_to(moe_lora_in_heap(share_outer(padded, every), every), dev)
    pools = {"per_expert": moe_lora_to(moe_lora_in_heap(padded), dev),
             "shared_rows": MoELoRAWeights(on.gate_up_a, on.gate_up_b, on.down_a, on.down_b, on.ranks, False),
             "shared_tokens": on}
    rows = []
    for m in tokens:
        hidden, tw, ids, slots = make_batch(m, d, e, k, n, gen)
        base = fused_moe(hidden, w_gate_up, w_down, tw, ids)
        row = {"M": m, "n": n, "base_ms": time_graph(lambda: fused_moe(hidden, w_gate_up, w_down, tw, ids)),
               "path": lora_path(m, k, inter)}
        outs = {}
        for name, pool in pools.items():
            call = lambda pool=pool: fused_moe(hidden, w_gate_up, w_down, tw, ids, pool, slots)  # noqa: E731
            outs[name] = call()
            row[f"{name}_ratio"] = time_graph(call) / row["base_ms"]
        row["tokens_vs_rows_delta_rel"] = rel(outs["shared_tokens"] - base, outs["shared_rows"] - base)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def idle_slots(bw, gen, tokens):
    """qwen3 layer, 4 adapters in use: a pool of 64 slots vs a pool of 4."""
    d, inter, e, _ = PRESETS["qwen3-30b-a3b"]
    rows = []
    for slots in (4, 64):
        layer = make_layer(d, inter, e, slots, gen)
        rows += [run_config("qwen3-30b-a3b", layer, m, 4, bw, gen) for m in tokens]
        del layer
    return rows


BASE_CONFIGS = [(*tiles, 1) for tiles in [  # (block_m, block_n, block_k, warps, stages, group_m)
    (16, 64, 128, 4, 3), (16, 32, 128, 4, 3), (16, 64, 256, 4, 2), (16, 128, 64, 4, 4),
    (32, 64, 64, 4, 4), (32, 128, 64, 4, 3)]] + [
    (*tiles, group) for tiles in [(64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                  (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
    for group in (1, 4, 8, 16)]


def sweep_base(gen, tokens=(8, 128, 512, 2048), preset="qwen3-30b-a3b"):
    """Times the base gate_up and down GEMMs alone over tile configs (block_m, block_n, block_k,
    warps, stages, group_m): where the base loses time. Each size tries the engine's block rows
    (launch._base_block_m), half and twice them, the large ones with the tile walk by groups of
    blocks (group_m)."""
    d, inter, e, k = PRESETS[preset]
    w_gate_up, w_down, _ = make_layer(d, inter, e, 1, gen)
    rows = []
    for m in tokens:
        hidden, tw, ids, _ = make_batch(m, d, e, k, 1, gen)
        gate_up = torch.empty(m * k, 2 * inter, dtype=DTYPE, device="cuda")
        act = torch.randn(m * k, inter, device="cuda", generator=gen).to(DTYPE)
        y = torch.empty(m * k, d, dtype=DTYPE, device="cuda")
        weights = tw.reshape(-1).float()
        gemms = {"gate_up": lambda lay, c: moe_gemm(hidden, w_gate_up, gate_up, lay, n=2 * inter, k=d, a_row_div=k, **c),
                 "down": lambda lay, c: moe_gemm(act, w_down, y, lay, n=d, k=inter, scale=weights, **c)}
        default_bm = _base_block_m(m * k, e)
        for bm, bn, bk, warps, stages, group in BASE_CONFIGS:
            if not default_bm // 2 <= bm <= 2 * default_bm:  # the engine's block rows and their neighbours
                continue
            lay = moe_align_virtual(ids, None, e, bm)
            cfg = {"block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages, "group_m": group}
            for name, fn in gemms.items():
                try:
                    ms = time_graph(lambda: fn(lay, cfg), samples=7)
                except Exception as exc:  # a config that does not fit (shared memory)
                    print(f"{name} M={m} cfg={[bm, bn, bk, warps, stages, group]}: {type(exc).__name__}", flush=True)
                    continue
                flops = 2 * m * k * (2 * inter if name == "gate_up" else d) * (d if name == "gate_up" else inter)
                rows.append({"preset": preset, "M": m, "op": name, "cfg": [bm, bn, bk, warps, stages, group],
                             "default_block_m": default_bm, "ms": ms, "tflops": flops / ms / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nbase GEMMs, best per (M, op), {preset}; cfg = (block_m, block_n, block_k, warps, stages, group_m)")
    for (m, op), row in best_per_op(rows):
        print(f"M={m:5} {op:8} cfg={row['cfg']} {row['ms']:.4f} ms {row['tflops']:.0f} TFLOP/s")
    return rows


def profile_virt(gen, tokens=(1, 512), preset="qwen3-30b-a3b", adapters=(16,)) -> list[dict]:
    """Per-kernel device time of the base and the virtual-expert path at each M and n, as the
    default paths run them; printed and returned (us a call of fused_moe, by kernel name)."""
    d, inter, e, k = PRESETS[preset]
    w_gate_up, w_down, lora = make_layer(d, inter, e, max(adapters), gen)
    calls, rows = 10, []
    for m in tokens:
        for n in adapters:
            hidden, tw, ids, slots = make_batch(m, d, e, k, n, gen)
            for label, ad in (("base", None), (f"virtual n={n}", lora)):
                if label == "base" and n != adapters[0]:
                    continue  # the base does not depend on n
                fused_moe(hidden, w_gate_up, w_down, tw, ids, ad, slots if ad else None)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        fused_moe(hidden, w_gate_up, w_down, tw, ids, ad, slots if ad else None)
                    torch.cuda.synchronize()
                print(f"profile {preset} M={m} {label} ({calls} calls)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
                kernels = sorted(((ev.key, ev.count // calls, _device_us(ev) / calls) for ev in prof.key_averages()
                                  if _device_us(ev) > 0), key=lambda kv: -kv[2])
                rows.append({"preset": preset, "M": m, "n": 0 if ad is None else n, "label": label,
                             "us_a_call": sum(us for _, _, us in kernels),
                             "kernels": [{"name": name, "launches": count, "us": us} for name, count, us in kernels]})
    return rows


def _device_us(event) -> float:
    """A profiler average's device time (torch renamed cuda_time_total to device_time_total)."""
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def best_per_op(rows: list[dict]) -> list[tuple[tuple[int, str], dict]]:
    """The fastest row of each (M, op) of a sweep, sorted by (M, op)."""
    best = {}
    for row in rows:
        key = (row["M"], row["op"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    return sorted(best.items())


SHRINK_CONFIGS = [(bk, w, st) for bk in (64, 128, 256) for w in (2, 4) for st in (2, 3, 4)]
EXPAND_CONFIGS = [(bn, w, st) for bn in (64, 128, 256) for w in (4, 8) for st in (1, 2)]
BLOCKS_CONFIGS = [(bn, w, st, p) for bn in (64, 128, 256) for w in (4, 8) for st in (2, 3) for p in (1, 2, 4, 8)]


def layer_batches(gen, tokens, n=16, ranks=(RANK,), preset="qwen3-30b-a3b"):
    """The sweeps' inputs: a layer's n LoRA slots (ranks cycled over them), then for each M
    its batch (hidden, routing weights, ids, slots) and the sum of the ranks of the (slot, expert)
    pairs it touches (adapter bytes scale with it)."""
    d, inter, e, k = PRESETS[preset]
    _, _, lora = make_layer(d, inter, e, n, gen, ranks)
    for m in tokens:
        batch = make_batch(m, d, e, k, n, gen)
        pairs = torch.unique(batch[3][:, None].long() * e + batch[2].long())
        yield m, lora, batch, int(lora.ranks[pairs // e].sum())


def sweep_lora(gen, tokens=(64, 512, 2048), preset="qwen3-30b-a3b", block_ms=(16,)):
    """Times each LoRA GEMM of the split path alone over tile configs (n = 16) against its own
    bytes floor (adapter bytes of the pairs touched + activation rows read and written); the
    expands both by tiles (lora_expand_tiles) and by blocks (lora_expand, one program a block)."""
    d, inter, e, k = PRESETS[preset]
    bw, r, rows = copy_bandwidth(), RANK, []
    for m, lora, (hidden, tw, ids, slots), rank_sum in layer_batches(gen, tokens, preset=preset):
        pairs, t = rank_sum // r, m * k
        gate_up = torch.empty(t, 2 * inter, dtype=DTYPE, device="cuda")
        act = torch.randn(t, inter, device="cuda", generator=gen).to(DTYPE)
        y = torch.empty(t, d, dtype=DTYPE, device="cuda")
        s_gu = torch.zeros(t, 2 * r, dtype=torch.float32, device="cuda")
        s_d = torch.zeros(t, r, dtype=torch.float32, device="cuda")
        weights = tw.reshape(-1).float()
        ops = {  # name -> (bytes floor, fn(layout, cfg))
            "gu_shrink": (pairs * 2 * r * d * BYTES + m * d * BYTES + t * 2 * r * 4, lambda lay, c: lora_shrink(
                hidden, lora.gate_up_a, s_gu, lay, lora.ranks, n=r, k=d, a_row_div=k, splits=2, block_n=16, block_k=c[0], num_warps=c[1], num_stages=c[2])),
            "gu_expand": (pairs * 2 * inter * r * BYTES + t * 2 * r * 4 + 2 * t * 2 * inter * BYTES, lambda lay, c: lora_expand_tiles(
                s_gu, lora.gate_up_b, gate_up, lay, lora.ranks, n=inter, k=r, splits=2, block_k=16, block_n=c[0], num_warps=c[1], num_stages=c[2])),
            "down_shrink": (pairs * r * inter * BYTES + t * inter * BYTES + t * r * 4, lambda lay, c: lora_shrink(
                act, lora.down_a, s_d, lay, lora.ranks, n=r, k=inter, block_n=16,
                block_k=c[0], num_warps=c[1], num_stages=c[2])),
            "down_expand": (pairs * d * r * BYTES + t * r * 4 + 2 * t * d * BYTES, lambda lay, c: lora_expand_tiles(
                s_d, lora.down_b, y, lay, lora.ranks, n=d, k=r, scale=weights, block_k=16, block_n=c[0], num_warps=c[1], num_stages=c[2])),
            "gu_expand_blocks": (pairs * 2 * inter * r * BYTES + t * 2 * r * 4 + 2 * t * 2 * inter * BYTES, lambda lay, c: lora_expand(
                s_gu, lora.gate_up_b, gate_up, lay, lora.ranks, splits=2, block_n=c[0], num_warps=c[1], num_stages=c[2], parts=c[3])),
            "down_expand_blocks": (pairs * d * r * BYTES + t * r * 4 + 2 * t * d * BYTES, lambda lay, c: lora_expand(
                s_d, lora.down_b, y, lay, lora.ranks, scale=weights, block_n=c[0], num_warps=c[1], num_stages=c[2], parts=c[3])),
        }
        configs = lambda name: (SHRINK_CONFIGS if "shrink" in name else  # noqa: E731
                                BLOCKS_CONFIGS if name.endswith("blocks") else EXPAND_CONFIGS)
        for bm in block_ms:
            lay = moe_align_virtual(ids, slots, e, bm, lora.num_slots)
            for name, (floor, fn) in ops.items():
                for cfg in configs(name):
                    try:
                        ms = time_graph(lambda: fn(lay, cfg), samples=7)
                    except Exception as exc:  # a config that does not compile (shared memory)
                        print(f"{name} M={m} bm={bm} cfg={cfg}: {type(exc).__name__}", flush=True)
                        continue
                    rows.append({"M": m, "op": name, "bm": bm, "cfg": cfg, "ms": ms,
                                 "floor_ms": floor / bw * 1e3, "pairs": pairs})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\nbest per (M, op), copy bandwidth {bw / 1e12:.2f} TB/s")
    for (m, op), row in best_per_op(rows):
        print(f"M={m:5} {op:12} bm={row['bm']:3} cfg={row['cfg']} {row['ms']:.4f} ms  floor {row['floor_ms']:.4f} ms"
              f"  x{row['ms'] / row['floor_ms']:.2f}")
    return rows


ROWS_CONFIGS = [(bk, bn, w, st, p) for bk in (128, 256) for bn in (64, 128) for w in (2, 4)
                for st in (3,) for p in (1, 2, 4)]
# With mixed ranks: the kernel before rank buckets at today's tiles, then buckets over tile_r.
MIXED_ROWS_CONFIGS = [(256, 128, 4, 3, 0, 0, False)] + [
    (bk, bn, w, 3, p, tr, True) for tr in (16, 32, 64) for bk in (128, 256) for bn in (128, 256)
    for w in (4,) for p in (0, 2)]


def sweep_rows(gen, tokens=(1, 8, 64), n=16, ranks=(RANK,), preset="qwen3-30b-a3b"):
    """Times each projection of the row path (kernels/moe/lora_rows.py) alone over tile configs
    (n adapters, ranks cycled over them) against its bytes floor (adapter bytes of the pairs
    touched). cfg = (block_k, block_n, warps, stages, parts[, tile_r, buckets]); parts 0: the
    engine's (launch._row_parts)."""
    d, inter, e, k = PRESETS[preset]
    mixed = len(set(ranks)) > 1
    bw, rows = copy_bandwidth(), []
    for m, lora, (hidden, tw, ids, slots), rank_sum in layer_batches(gen, tokens, n, ranks, preset):
        gate_up = torch.zeros(m * k, 2 * inter, dtype=DTYPE, device="cuda")
        act = torch.randn(m * k, inter, device="cuda", generator=gen).to(DTYPE)
        y = torch.zeros(m * k, d, dtype=DTYPE, device="cuda")
        weights = tw.reshape(-1).float()
        tiles = lambda c, splits: {"block_k": c[0], "block_n": c[1], "num_warps": c[2], "num_stages": c[3],  # noqa: E731
                                   "parts": c[4] or _row_parts(m * k, splits),
                                   **({"tile_r": c[5], "buckets": c[6]} if len(c) > 5 else {})}
        ops = {
            "gate_up": (rank_sum * 2 * (d + inter) * BYTES, lambda c: lora_rows_(
                hidden, gate_up, lora.gate_up_a, lora.gate_up_b, lora.ranks, slots, ids, a_row_div=k, splits=2,
                **tiles(c, 2))),
            "down": (rank_sum * (inter + d) * BYTES, lambda c: lora_rows_(
                act, y, lora.down_a, lora.down_b, lora.ranks, slots, ids, a_row_div=1, scale=weights,
                **tiles(c, 1))),
        }
        for name, (floor, fn) in ops.items():
            for cfg in MIXED_ROWS_CONFIGS if mixed else ROWS_CONFIGS:
                ms = time_graph(lambda: fn(cfg), samples=7)
                rows.append({"M": m, "op": name, "cfg": cfg, "ms": ms, "floor_ms": floor / bw * 1e3,
                             "rank_sum": rank_sum, "n": n, "ranks": list(ranks)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nrow path, best per (M, op), copy bandwidth {bw / 1e12:.2f} TB/s, n = {n}, ranks {list(ranks)}; "
          "cfg = (block_k, block_n, warps, stages, parts[, tile_r, buckets])")
    for (m, op), row in best_per_op(rows):
        print(f"M={m:5} {op:8} cfg={row['cfg']} {row['ms'] * 1e3:.1f} us  floor {row['floor_ms'] * 1e3:.1f} us"
              f"  x{row['ms'] / row['floor_ms']:.2f}")
        if mixed:
            old = next(r for r in rows if r["M"] == m and r["op"] == op and not r["cfg"][6])
            print(f"          before buckets {old['ms'] * 1e3:.1f} us  x{old['ms'] / row['floor_ms']:.2f}")
    return rows


# each first config (0s) is the engine's own tiles, as is COLD_ROWS_CONFIGS[0]
TOPK_SUM_CONFIGS = [(0, 0)] + [(bd, w) for bd in (32, 64, 128, 256) for w in (1, 2, 4, 8)]
SILU_SHRINK_CONFIGS = [(0, 0)] + [(b, w) for b in (256, 512, 1024) for w in (2, 4, 8)]
COLD_ROWS_CONFIGS = [(256, 128, 4, 3, 0), (128, 128, 4, 3, 0), (256, 64, 4, 3, 0), (256, 128, 8, 3, 0),
                     (256, 128, 4, 4, 0), (256, 128, 4, 3, 1), (256, 128, 4, 3, 4)]


def sweep_decode(gen, tokens=(64,), n=16, copies=8):
    """The row path's launches at decode size with adapter weights cold, as in the engine's step
    (48 layers stream ~1.2 GB each between one layer's LoRA launch and the next's): each timed
    graph runs the launch once on each of `copies` layers' LoRA weights (8 x 377 MB; a launch's
    (slot, expert) pairs then come from DRAM), and the time is per launch. Sweeps the gate/up row
    kernel's tiles, silu_mul_shrink's (block, warps) and topk_sum's (block_d, warps) with the down
    fold, beside silu_mul and topk_sum without LoRA (their base cost), and the dense groups' split
    path (q/k/v, o: cfg = (K slices, shrink block_k, warps, expand block_n, warps), 0 = the
    engine's); qwen3, n rank-16 adapters on the adapter heap's layout."""
    from kernels.moe.activation import silu_mul
    from kernels.moe.down_fold import rank_block, silu_mul_shrink, topk_sum
    d, inter, e, k = PRESETS["qwen3-30b-a3b"]
    from kernels.moe.dense_launch import dense_layout, lora_group_triton_
    try:
        from bench_dense_lora import make_attention
        from tests.kernels.loop_reference import moe_lora_in_heap, moe_lora_to
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.bench_dense_lora import make_attention
        from tests.kernels.loop_reference import moe_lora_in_heap, moe_lora_to
    bw, rows, r = copy_bandwidth(), [], RANK
    loras = []
    for _ in range(copies):  # as the engine's adapter heap lays them out (lora_layout=bytes)
        lora = make_layer(d, inter, e, n, gen)[2]
        padded = MoELoRAWeights(*(f.padded.cpu() for f in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b)),
                                lora.ranks.cpu())
        del lora
        loras.append(moe_lora_to(moe_lora_in_heap(padded, rank_unit=8), "cuda"))
    attns = [make_attention("qwen3-30b-a3b", n, gen, heap=True) for _ in range(copies)]
    attn_in = attns[0]["o_in"]
    for m in tokens:
        hidden, tw, ids, slots = make_batch(m, d, e, k, n, gen)
        pairs = torch.unique(slots[:, None].long() * e + ids.long()).numel()
        t = m * k
        gate_up = torch.randn(t, 2 * inter, device="cuda", generator=gen).to(DTYPE)
        act = torch.empty(t, inter, dtype=DTYPE, device="cuda")
        y = torch.randn(t, d, device="cuda", generator=gen).to(DTYPE)
        out = torch.empty(m, d, dtype=DTYPE, device="cuda")
        shrunk = torch.randn(t, rank_block(r), device="cuda", generator=gen)
        weights = tw.reshape(-1).float()
        gu_out = torch.zeros(t, 2 * inter, dtype=DTYPE, device="cuda")
        ops = {  # name -> (bytes floor of the LoRA part, configs, fn(lora, cfg))
            "silu_mul": (0, [None], lambda lo, c: silu_mul(gate_up, act)),
            "silu_mul_shrink": (pairs * r * inter * BYTES, SILU_SHRINK_CONFIGS, lambda lo, c: silu_mul_shrink(
                gate_up, act, shrunk, lo.down_a, lo.ranks, slots, ids, block=c[0], num_warps=c[1])),
            "topk_sum": (0, [None], lambda lo, c: topk_sum(y, out, k)),
            "topk_sum_lora": (pairs * d * r * BYTES, TOPK_SUM_CONFIGS, lambda lo, c: topk_sum(
                y, out, k, (lo.down_b, lo.ranks, shrunk, weights, slots, ids), block_d=c[0], num_warps=c[1])),
            "gate_up_rows": (pairs * 2 * r * (d + inter) * BYTES, COLD_ROWS_CONFIGS, lambda lo, c: lora_rows_(
                hidden, gu_out, lo.gate_up_a, lo.gate_up_b, lo.ranks, slots, ids, a_row_div=k, splits=2,
                block_k=c[0], block_n=c[1], num_warps=c[2], num_stages=c[3], parts=c[4] or _row_parts(t, 2),
                tile_r=32)),
        }
        # the dense groups' split path (q/k/v, o): K slices and shrink tiles, then expand tiles
        x, attn = hidden, torch.randn(m, attn_in, device="cuda", generator=gen).to(DTYPE)
        dense_out = {"qkv": torch.zeros(m, sum(attns[0]["qkv"].sections), dtype=DTYPE, device="cuda"),
                     "o": torch.zeros(m, d, dtype=DTYPE, device="cuda")}
        lay = dense_layout(slots, n)
        for g, inp in (("qkv", x), ("o", attn)):
            group = attns[0][g]
            floor = int(group.ranks[0, :n].sum()) * (group.a.shape[3] * group.num_projections + group.b.shape[2]) * BYTES
            dense_cfgs = [(0, 0, 0, 0, 0)] + [(ks, bk, w, 0, 0) for ks in (2, 4, 8) for bk in (128, 256) for w in (2, 4)]
            dense_cfgs += [(0, 0, 0, bn, w) for bn in (128, 256) for w in (4, 8)]
            ops[f"dense_{g}"] = (floor, dense_cfgs, lambda lo, c, g=g, inp=inp: lora_group_triton_(
                inp, dense_out[g], lo[g], lay, k_splits=c[0], shrink={"block_k": c[1], "num_warps": c[2]} if c[0] else None,
                expand={"block_n": c[3], "num_warps": c[4]} if c[3] else None))
        for name, (floor, configs, fn) in ops.items():
            for cfg in configs:
                layers = attns if name.startswith("dense_") else loras
                run = lambda: [fn(lo, cfg) for lo in layers]  # noqa: E731
                try:
                    ms = time_graph(run, samples=9) / copies
                except Exception as exc:  # a config that does not compile (registers, shared memory)
                    print(f"{name} M={m} cfg={cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                rows.append({"M": m, "op": name, "cfg": cfg, "us": ms * 1e3, "floor_us": floor / bw * 1e6,
                             "pairs": pairs, "n": n, "copies": copies})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\ndecode launches, cold weights ({copies} copies), best per (M, op), copy bandwidth "
          f"{bw / 1e12:.2f} TB/s, n = {n}")
    for m in tokens:
        for op in ops:
            cand = [row for row in rows if row["M"] == m and row["op"] == op]
            if cand:
                best = min(cand, key=lambda row: row["us"])
                print(f"M={m:4} {op:16} best cfg={best['cfg']} {best['us']:.1f} us  floor {best['floor_us']:.1f} us  "
                      f"the engine's {cand[0]['us']:.1f} us")
    return {"copy_bw_Bps": bw, "rows": rows}


def print_table(rows, bw):
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    head = "preset          M     n  slots  base_ms  loop/base  virt/base  floor/base  delta/floor  base_bw  err      path"
    print(head)
    for r in rows:
        print(f"{r['preset']:<14}{r['M']:>5}{r['n']:>5}{r['slots']:>6}{r['base_ms']:>9.3f}"
              f"{r['loop_ratio']:>11.2f}{r['virt_ratio']:>11.2f}{r['floor_ratio']:>12.2f}"
              f"{r['delta_over_floor']:>13.2f}{r['base_bw_frac']:>9.2f}{r['delta_rel_err_vs_loop']:>9.1e}"
              f"  {r['virt_path']}  " + " ".join(f"{p} {v:.2f}" for p, v in r.get("path_ratios", {}).items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results JSON (default bench_moe_lora.json; kernel_profile.json "
                    "with --profile-only)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--adapters", nargs="*", type=int, default=None,
                    help=f"adapters in use (default {ADAPTERS}; --sweep-rows: the first, default 16)")
    ap.add_argument("--sweep-base", action="store_true", help="time the base GEMMs' tile configs at --tokens on "
                    "the first of --presets, exit")
    ap.add_argument("--sweep-lora", action="store_true", help="time each LoRA GEMM of the split path over tile "
                    "configs at --tokens on the first of --presets, exit")
    ap.add_argument("--profile-only", action="store_true", help="per-kernel profile at --tokens, exit")
    ap.add_argument("--sweep-rows", action="store_true", help="time the row path's tile configs at --tokens on "
                    "the first of --presets, exit")
    ap.add_argument("--sweep-decode", action="store_true", help="the row path's launches at --tokens with cold "
                    "adapter weights (--copies layers of them): tiles of the gate/up rows, silu_mul_shrink and "
                    "topk_sum, exit")
    ap.add_argument("--copies", type=int, default=8, help="--sweep-decode: layers of adapter weights cycled")
    ap.add_argument("--shared-outer", action="store_true", help="virtual / base at --tokens on the adapter "
                    "heap: per-expert adapters, and shared-outer ones with each row's shrink / once a token, exit")
    ap.add_argument("--ranks", nargs="*", type=int, default=[RANK],
                    help="adapter ranks cycled over the slots (--sweep-rows and the virtual / base runs; "
                    "e.g. 8 16 32 64 with --adapters 25: the workload trace's mix)")
    ap.add_argument("--block-m", nargs="*", type=int, default=[LORA_BLOCK_M],
                    help="--sweep-lora: the layouts' rows a (slot, expert) block")
    ap.add_argument("--rows-max-parts", type=int, default=0, help="the row path's most programs a row's "
                    "columns split into (kernels.moe.launch.ROWS_MAX_PARTS; 0: the engine's)")
    ap.add_argument("--paths", nargs="*", default=[], choices=[p for p in LORA_PATHS if p != "auto"],
                    help="also time the virtual layer through each LoRA path (same run, virt/base)")
    args = ap.parse_args()
    args.out = args.out or ("kernel_profile.json" if args.profile_only else "bench_moe_lora.json")
    if args.rows_max_parts:
        launch.ROWS_MAX_PARTS = args.rows_max_parts
    if not (args.sweep_rows or args.shared_outer or args.sweep_decode):
        args.adapters = args.adapters or ADAPTERS
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.sweep_decode:
        json.dump({"provenance": provenance(sys.argv), "sweep": sweep_decode(gen, args.tokens, (args.adapters or [16])[0],
                                                                            args.copies)}, open(args.out, "w"), indent=1)
        return
    if args.sweep_rows:
        json.dump({"provenance": provenance(sys.argv), "preset": args.presets[0],
                   "sweep": sweep_rows(gen, args.tokens, (args.adapters or [16])[0], tuple(args.ranks), args.presets[0])},
                  open(args.out, "w"), indent=1)
        return
    if args.sweep_lora:
        json.dump({"provenance": provenance(sys.argv), "preset": args.presets[0],
                   "sweep": sweep_lora(gen, args.tokens, args.presets[0], tuple(args.block_m))}, open(args.out, "w"), indent=1)
        return
    if args.shared_outer:
        json.dump({"provenance": provenance(sys.argv),
                   "shared_outer": shared_outer(gen, args.tokens, (args.adapters or [16])[0])}, open(args.out, "w"), indent=1)
        return
    if args.profile_only:  # written after each preset: a run cut short keeps what it measured
        rows = []
        for preset in args.presets:
            rows += profile_virt(gen, args.tokens, preset, tuple(args.adapters or [16]))
            json.dump({"provenance": provenance(sys.argv), "profiles": rows}, open(args.out, "w"), indent=1)
        return
    if args.sweep_base:
        json.dump({"provenance": provenance(sys.argv), "preset": args.presets[0],
                   "sweep": sweep_base(gen, args.tokens, args.presets[0])}, open(args.out, "w"), indent=1)
        return
    bw = copy_bandwidth()
    rows, t0 = [], time.time()
    for preset in args.presets:
        d, inter, e, _ = PRESETS[preset]
        layer = make_layer(d, inter, e, max(args.adapters), gen, tuple(args.ranks))
        for n in args.adapters:
            for m in args.tokens:
                rows.append(run_config(preset, layer, m, n, bw, gen, args.paths))
                print(json.dumps(rows[-1]), flush=True)
            json.dump({"info": {"partial": True}, "sweep": rows}, open(args.out, "w"), indent=1)
        del layer
        torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_bw_Bps": bw, "date": time.strftime("%Y-%m-%d")}
    record = {"provenance": provenance(sys.argv), "info": info}
    save = lambda idle: json.dump({**record, "sweep": rows, "idle_slots": idle},  # noqa: E731
                                  open(args.out, "w"), indent=1)
    save([])
    idle = idle_slots(bw, gen, args.tokens)
    info["seconds"] = time.time() - t0
    save(idle)
    print_table(idle, bw)
    print_table(rows, bw)


if __name__ == "__main__":
    main()

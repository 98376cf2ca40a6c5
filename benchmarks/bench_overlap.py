"""Does a LoRA launch on a second stream overlap the base GEMM it sits beside, in a CUDA graph?

At decode the LoRA kernels are latency-bound (a few us of bytes in chains of dependent loads)
and the base GEMMs are bandwidth-bound. If the graph runs the two side by side, the LoRA costs
about its bytes; if the block scheduler runs them one after the other anyway, it costs what it
costs today. Per projection (MoE gate_up and down with the row kernel, dense q/k/v and o with
the split path), qwen3 shapes, n adapters of rank 16, M tokens, it times CUDA-graph replays of:
  - base alone, LoRA alone (into a separate fp32 delta buffer, zeroed first);
  - serial: the base, then the LoRA adding into its output (what the engine runs today);
  - overlap: the LoRA on a side stream forked before the base and joined after it, with the
    side stream at normal or high priority, captured LoRA first or base first.
Writes JSON with provenance.

    python benchmarks/bench_overlap.py [--tokens 8 32 64] [--adapters 16] [--out f.json]
"""
import argparse
import sys

import torch

from kernels.moe.align import moe_align_virtual
from kernels.moe.dense_launch import dense_group_triton_, dense_layout
from kernels.moe.grouped_gemm import moe_gemm
from kernels.moe.launch import ROWS_TILES_DOWN, ROWS_TILES_GATE_UP, _base_block_m, _base_config, _row_parts
from kernels.moe.lora_rows import lora_rows_

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from bench_dense_lora import make_attention
    from bench_moe_lora import PRESETS, make_batch, make_layer, time_graph
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.bench_dense_lora import make_attention
    from benchmarks.bench_moe_lora import PRESETS, make_batch, make_layer, time_graph
    from benchmarks.provenance import provenance, write_results


def forked(side_fn, main_fn, side: torch.cuda.Stream, side_first: bool):
    """A callable running side_fn on `side` beside main_fn on the current stream, joined after."""
    def fn():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        if not side_first:
            main_fn()
        with torch.cuda.stream(side):
            side_fn()
        if side_first:
            main_fn()
        cur.wait_stream(side)
    return fn


def variants(base, lora_apart, lora_into, streams) -> dict:
    """us of each way of running one projection's base and LoRA."""
    out = {"base_us": time_graph(base), "lora_us": time_graph(lora_apart),
           "serial_us": time_graph(lambda: (base(), lora_into()))}
    for name, side in streams.items():
        for first in (True, False):
            out[f"overlap_{name}_{'lora' if first else 'base'}_first_us"] = time_graph(forked(lora_apart, base, side, first))
    return {k: v * 1e3 for k, v in out.items()}


def moe_case(m: int, n: int, gen: torch.Generator, streams) -> dict:
    d, inter, e, k = PRESETS["qwen3-30b-a3b"]
    w_gate_up, w_down, lora = make_layer(d, inter, e, n, gen)
    hidden, tw, ids, slots = make_batch(m, d, e, k, n, gen)
    rows = m * k
    lay = moe_align_virtual(ids, None, e, _base_block_m(rows, e))
    cfg = _base_config(lay.block_size)
    gu = torch.empty(rows, 2 * inter, device="cuda", dtype=hidden.dtype)
    dgu = torch.zeros(rows, 2 * inter, device="cuda", dtype=torch.float32)
    act = torch.randn(rows, inter, device="cuda", generator=gen).to(hidden.dtype)
    y = torch.empty(rows, d, device="cuda", dtype=hidden.dtype)
    dy = torch.zeros(rows, d, device="cuda", dtype=torch.float32)
    w = tw.reshape(-1).float()
    rows_gu = dict(a_row_div=k, splits=2, parts=_row_parts(rows, 2), **ROWS_TILES_GATE_UP)
    rows_down = dict(a_row_div=1, scale=w, parts=_row_parts(rows, 1), **ROWS_TILES_DOWN)
    gate_up = variants(
        lambda: moe_gemm(hidden, w_gate_up, gu, lay, n=2 * inter, k=d, a_row_div=k, **cfg),
        lambda: lora_rows_(hidden, dgu.zero_(), lora.gate_up_a, lora.gate_up_b, lora.ranks, slots, ids, **rows_gu),
        lambda: lora_rows_(hidden, gu, lora.gate_up_a, lora.gate_up_b, lora.ranks, slots, ids, **rows_gu),
        streams)
    down = variants(
        lambda: moe_gemm(act, w_down, y, lay, n=d, k=inter, scale=w, **cfg),
        lambda: lora_rows_(act, dy.zero_(), lora.down_a, lora.down_b, lora.ranks, slots, ids, **rows_down),
        lambda: lora_rows_(act, y, lora.down_a, lora.down_b, lora.ranks, slots, ids, **rows_down),
        streams)
    return {"M": m, "n": n, "gate_up": gate_up, "down": down}


def dense_case(m: int, n: int, gen: torch.Generator, streams) -> dict:
    layer = make_attention("qwen3-30b-a3b", n, gen)
    x = torch.randn(m, layer["hidden"], generator=gen, device="cuda").to(torch.bfloat16)
    attn = torch.randn(m, layer["o_in"], generator=gen, device="cuda").to(torch.bfloat16)
    slots = torch.randint(0, n, (m,), generator=gen, device="cuda", dtype=torch.int32)
    qkv = torch.empty(m, layer["w_qkv"].shape[0], device="cuda", dtype=torch.bfloat16)
    o = torch.empty(m, layer["hidden"], device="cuda", dtype=torch.bfloat16)
    dqkv, do = torch.zeros_like(qkv, dtype=torch.float32), torch.zeros_like(o, dtype=torch.float32)
    lay = dense_layout(slots, n)
    out = {}
    for name, inp, wt, base_out, delta, group in (("qkv", x, layer["w_qkv"], qkv, dqkv, layer["qkv"]),
                                                  ("o", attn, layer["w_o"], o, do, layer["o"])):
        out[name] = variants(
            lambda inp=inp, wt=wt, base_out=base_out: torch.matmul(inp, wt.T, out=base_out),
            lambda inp=inp, delta=delta, group=group: dense_group_triton_(inp, delta.zero_(), group, slots, lay, "split"),
            lambda inp=inp, base_out=base_out, group=group: dense_group_triton_(inp, base_out, group, slots, lay, "split"),
            streams)
    return {"M": m, "n": n, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_overlap needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lo, hi = torch.cuda.Stream.priority_range()
    streams = {"normal": torch.cuda.Stream(priority=0), "high": torch.cuda.Stream(priority=hi)}
    results = {"moe": [], "dense": []}
    for m in args.tokens:
        results["moe"].append(moe_case(m, args.adapters, gen, streams))
        results["dense"].append(dense_case(m, args.adapters, gen, streams))
        for kind in ("moe", "dense"):
            row = results[kind][-1]
            for proj, t in row.items():
                if isinstance(t, dict):
                    print(f"{kind} M={m} {proj}: " + ", ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in t.items()),
                          flush=True)
    write_results({"provenance": provenance(sys.argv), **results}, args.out, "overlap")


if __name__ == "__main__":
    main()

"""MoE router on the GPU: today's torch sequence vs the one-launch Triton router.

Times CUDA-graph replays (median of event-timed samples) of
  torch:  softmax(fp32) + topk + renormalise + cast   (route_topk_ref, SparseMoE.route today)
  triton: route_topk_triton
alone and behind the router GEMM F.linear(x, router), bf16, at E=128, K=8 (Qwen3-30B-A3B).
--sweep also times other (BLOCK_T, num_warps) tiles of the kernel. Prints a table last, writes JSON
with provenance.

    python benchmarks/bench_router.py --out bench_router.json [--sweep]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench_moe_lora import time_graph as time_graph_ms
from kernels.moe.router import launch_route_topk, route_topk_ref, route_topk_triton

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance

TOKENS = [1, 64, 512, 2048]
SWEEP = [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4), (16, 8)]  # (BLOCK_T, num_warps)


def time_graph(fn) -> float:
    """Median us of one call (bench_moe_lora's CUDA-graph replay timing, which returns ms)."""
    return 1e3 * time_graph_ms(fn, reps=200, samples=21)


def check(logits: torch.Tensor, top_k: int) -> dict:
    """Triton vs the torch twin on this input: id agreement (bf16 ties may reorder) and weight gap."""
    weights, ids = route_topk_triton(logits, top_k, True, logits.dtype)
    twin_w, twin_ids = route_topk_ref(logits, top_k, True, logits.dtype)
    return {"ids_equal_frac": float((ids == twin_ids).all(dim=1).float().mean()),
            "max_weight_diff": float((weights.float() - twin_w.float()).abs().max())}


def run_tokens(t: int, e: int, k: int, d: int, sweep: bool, gen: torch.Generator) -> dict:
    x = torch.randn(t, d, device="cuda", generator=gen).bfloat16()
    router = (torch.randn(e, d, device="cuda", generator=gen) * d ** -0.5).bfloat16()
    logits = F.linear(x, router)  # [T, E] bf16
    row = {"tokens": t, "experts": e, "top_k": k, "hidden": d, **check(logits, k)}
    row["torch_us"] = time_graph(lambda: route_topk_ref(logits, k, True, torch.bfloat16))
    row["triton_us"] = time_graph(lambda: route_topk_triton(logits, k, True, torch.bfloat16))
    row["gemm_torch_us"] = time_graph(lambda: route_topk_ref(F.linear(x, router), k, True, torch.bfloat16))
    row["gemm_triton_us"] = time_graph(lambda: route_topk_triton(F.linear(x, router), k, True, torch.bfloat16))
    row["gemm_only_us"] = time_graph(lambda: F.linear(x, router))
    if sweep:
        row["sweep_us"] = {f"bt{bt}w{w}": time_graph(lambda: launch_route_topk(logits, k, True, torch.bfloat16, bt, w))
                           for bt, w in SWEEP}
    return row


def print_table(rows: list[dict], layers: int) -> None:
    print(f"\nrouter, bf16, E={rows[0]['experts']}, K={rows[0]['top_k']}, D={rows[0]['hidden']}; "
          f"CUDA-graph replay, median us per call; per step = x {layers} layers")
    head = ("T", "torch", "triton", "speedup", "gemm+torch", "gemm+triton", "gemm", "saved/step us", "ids eq", "max dw")
    print("{:>6} {:>8} {:>8} {:>8} {:>11} {:>12} {:>7} {:>14} {:>7} {:>8}".format(*head))
    for r in rows:
        saved = (r["gemm_torch_us"] - r["gemm_triton_us"]) * layers
        print(f"{r['tokens']:>6} {r['torch_us']:>8.2f} {r['triton_us']:>8.2f} {r['torch_us'] / r['triton_us']:>7.2f}x "
              f"{r['gemm_torch_us']:>11.2f} {r['gemm_triton_us']:>12.2f} {r['gemm_only_us']:>7.2f} {saved:>14.1f} "
              f"{r['ids_equal_frac']:>7.3f} {r['max_weight_diff']:>8.1e}")
    for r in rows:
        if "sweep_us" in r:
            print(f"T={r['tokens']:>5} tiles: " + "  ".join(f"{n} {v:.2f}" for n, v in r["sweep_us"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=48, help="MoE layers a step, for the saved-per-step column")
    parser.add_argument("--sweep", action="store_true", help="also time other (BLOCK_T, num_warps) tiles")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [run_tokens(t, args.experts, args.top_k, args.hidden, args.sweep, gen) for t in args.tokens]
    with open(args.out, "w") as f:
        json.dump({"provenance": provenance(sys.argv), "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print_table(rows, args.layers)


if __name__ == "__main__":
    main()

"""Compile the engine's Triton kernels of two trees for an H100/H200 (sm_90) without a GPU and
compare their machine code: instructions, registers and the size of each loop, kernel by kernel.

Why: a refactor that leaves a kernel's Triton IR the same can still change what ptxas makes of
it (a literal 0 in place of a program id grew the base GEMM's K loop by ~20% and made prefill
steps ~5% slower on the H200). This finds such a change on a CPU machine, before a GPU A/B.

Needs a Triton whose NVIDIA backend ships ptxas and cuobjdump (the PyPI wheels do), ideally the
GPU image's version, kept apart from the venv's:

    pip install --target /tmp/triton36 --no-deps triton==3.6.0
    git worktree add --detach /tmp/old <sha>
    python benchmarks/compare_sass.py /tmp/old . --triton /tmp/triton36 [--out /tmp/sass]

Each tree compiles in a subprocess of its own (both are the package `kernels`): the launchers run
at Qwen3-30B-A3B shapes on CPU tensors with every launch turned into a compile-only warm-up.
Prints one row per launch, in launch order; rows that differ are marked. Not a timing: a loop
that grew is a reason to measure, not a measurement.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

_SHAPES = {"tokens": 2048, "heads": 32, "kv_heads": 4, "head_dim": 128, "experts": 128, "top_k": 8,
           "inter": 768, "hidden": 2048, "slots": 16, "rank": 16}


def compiled_launches(launch, pdl: bool = False) -> list[tuple[str, object]]:
    """(kernel name, compiled kernel) of every Triton launch `launch()` makes, compiled for sm_90
    on this CPU machine (no GPU: each launch becomes a compile-only warm-up), in launch order; with
    pdl, the kernels as a Hopper card launches them (programmatic dependent launch on). Run in a
    process of its own: it replaces Triton's active driver and JITFunction.run for good."""
    import torch
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Sm90:  # the active driver Triton asks for a device, a stream and a target
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Sm90())
    compiled = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    jit.JITFunction.run = compile_only
    if pdl:
        import kernels.pdl
        kernels.pdl.use_pdl = lambda device: True
        import kernels.moe.grouped_gemm
        kernels.moe.grouped_gemm.use_pdl = kernels.pdl.use_pdl
    launch()
    return compiled


def _compile_tree(out: str) -> None:
    """Child: compile every kernel launch of the engine's prefill and decode paths into out/."""
    import torch
    compiled = compiled_launches(lambda: _launch_all(torch), os.environ.get("MOEPLEX_SASS_PDL") == "1")
    for i, (name, kernel) in enumerate(compiled):
        with open(os.path.join(out, f"{i:02d}_{name}.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])


def _launch_all(torch) -> None:
    from kernels.attention.paged_attention import paged_decode_attention
    from kernels.attention.prefill_attention import paged_prefill_attention
    from kernels.moe import launch
    from kernels.moe.dense_launch import dense_group_triton_
    from kernels.weights import DenseLoRAGroup, MoELoRAWeights

    s, bf = _SHAPES, torch.bfloat16
    t, h, kv, d, e, k = s["tokens"], s["heads"], s["kv_heads"], s["head_dim"], s["experts"], s["top_k"]
    inter, hid, slots, r = s["inter"], s["hidden"], s["slots"], s["rank"]
    qkv = torch.empty(t, (h + 2 * kv) * d, dtype=bf)  # q is a view of the fused q/k/v output
    k_cache = torch.empty(4096, 16, kv, d, dtype=bf)
    paged_prefill_attention(qkv[:, :h * d].view(t, h, d), k_cache, torch.empty_like(k_cache),
                            torch.zeros(4, 40, dtype=torch.long), torch.zeros(5, dtype=torch.int32),
                            torch.zeros(4, dtype=torch.int32), 0.088, max_query_len=512)
    paged_decode_attention(qkv[:64, :h * d].view(64, h, d), k_cache, torch.empty_like(k_cache),
                           torch.zeros(64, 40, dtype=torch.long), torch.zeros(64, dtype=torch.long), 0.088)
    ids = torch.zeros(t, k, dtype=torch.int32)
    w_gate_up, w_down = torch.empty(e, 2 * inter, hid, dtype=bf), torch.empty(e, hid, inter, dtype=bf)
    lora = MoELoRAWeights(torch.empty(slots, e, 2 * r, hid, dtype=bf), torch.empty(slots, e, 2 * inter, r, dtype=bf),
                          torch.empty(slots, e, r, inter, dtype=bf), torch.empty(slots, e, hid, r, dtype=bf),
                          torch.full((slots,), r, dtype=torch.int32))
    heap = os.environ.get("MOEPLEX_SASS_HEAP") == "1"
    if heap:  # the pools as the engine's adapter heap holds them (tests/kernels/loop_reference.py)
        from tests.kernels.loop_reference import group_in_heap, moe_lora_in_heap
        lora = moe_lora_in_heap(lora)
    for tokens, path in ((t, None), (64, None), (1, "fused"), (64, "rows"), (64, "split-tiles"),
                         (t, "split-blocks"), (t, "split-tiles")):
        launch.fused_moe_triton(torch.empty(tokens, hid, dtype=bf), w_gate_up, w_down, torch.empty(tokens, k),
                                ids[:tokens], None if path is None else lora,
                                None if path is None else torch.zeros(tokens, dtype=torch.int32),
                                path=path or "auto")
    group = DenseLoRAGroup(torch.empty(slots, 3 * r, hid, dtype=bf), torch.empty(slots, (h + 2 * kv) * d, r, dtype=bf),
                           torch.full((3, slots), r, dtype=torch.int32), (h * d, kv * d, kv * d))
    if heap:
        from kernels.weights import DenseLoRAWeights
        a, b, ends = group.a.padded, group.b.padded, [0, h * d, (h + kv) * d, (h + 2 * kv) * d]
        parts = [DenseLoRAWeights(a[:, i * r:(i + 1) * r], b[:, ends[i]:ends[i + 1]], group.ranks[i]) for i in range(3)]
        group = group_in_heap(parts, group.sections)
    for tokens in (64, t):
        dense_group_triton_(torch.empty(tokens, hid, dtype=bf), torch.empty(tokens, (h + 2 * kv) * d, dtype=bf),
                            group, torch.zeros(tokens, dtype=torch.int32))
    try:  # the fused dense launch (trees that have it), K slices as 132 SMs give them
        from kernels.moe.dense_gemm import dense_lora_gemm
    except ImportError:
        return
    x, slot_ids = torch.empty(64, hid, dtype=bf), torch.zeros(64, dtype=torch.int32)
    for lora in (group, None):
        dense_lora_gemm(x, torch.empty((h + 2 * kv) * d, hid, dtype=bf), None, lora, slot_ids, None,
                        sections=group.sections, k_slices_=2)
    o = DenseLoRAGroup(torch.empty(slots, r, h * d, dtype=bf), torch.empty(slots, hid, r, dtype=bf),
                       torch.full((1, slots), r, dtype=torch.int32), (hid,))
    dense_lora_gemm(torch.empty(64, h * d, dtype=bf), torch.empty(hid, h * d, dtype=bf), None, o, slot_ids, None,
                    k_slices_=5)


def _cuobjdump(triton_dir: str) -> str:
    found = glob.glob(os.path.join(triton_dir, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    if not found:
        sys.exit(f"no cuobjdump under {triton_dir}/triton/backends/nvidia/bin: install a Triton wheel there")
    return found[0]


def sass_stats(cubin: str, cuobjdump: str) -> dict:
    """Instructions, registers, and each backward branch's loop length in instructions."""
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    addressed = [m for m in (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line) for line in sass.splitlines()) if m]
    loops = []
    for m in addressed:
        branch = re.search(r"BRA (0x[0-9a-f]+)", m.group(2))
        here = int(m.group(1), 16)
        if branch and int(branch.group(1), 16) < here:  # sm_90 instructions are 16 bytes
            loops.append((here - int(branch.group(1), 16)) // 16 + 1)
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    return {"instructions": len(addressed), "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "loops": loops}


def _close(a: dict, b: dict) -> bool:
    """Same loops within 2 instructions (or 2%) each, and registers in the same granule of 8."""
    return (len(a["loops"]) == len(b["loops"]) and a["registers"] // 8 == b["registers"] // 8
            and all(abs(x - y) <= max(2, x // 50) for x, y in zip(a["loops"], b["loops"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="a tree to compare (e.g. a git worktree of the old commit)")
    parser.add_argument("new", help="the other tree")
    parser.add_argument("--triton", required=True, help="a directory a Triton wheel was installed into (--target)")
    parser.add_argument("--out", default="/tmp/moeplex-sass", help="cubins land in OUT/old and OUT/new")
    parser.add_argument("--heap-new", action="store_true", help="the new tree's LoRA pools laid out as "
                        "the engine's adapter heap (each slot at its own rank), the old tree's as padded stacks")
    parser.add_argument("--pdl-new", action="store_true", help="the new tree's kernels with programmatic "
                        "dependent launch on (kernels/pdl.py), as an H100/H200 runs them; the CPU compile has it off")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _compile_tree(args.child)
        return
    cuobjdump = _cuobjdump(args.triton)
    stats = {}
    for side, tree in (("old", args.old), ("new", args.new)):
        out = os.path.join(args.out, side)
        os.makedirs(out, exist_ok=True)
        for stale in glob.glob(os.path.join(out, "*.cubin")):
            os.remove(stale)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.triton, os.path.abspath(tree)])}
        env.pop("TRITON_INTERPRET", None)
        env["MOEPLEX_SASS_HEAP"] = "1" if args.heap_new and side == "new" else "0"
        env["MOEPLEX_SASS_PDL"] = "1" if args.pdl_new and side == "new" else "0"
        subprocess.run([sys.executable, os.path.abspath(__file__), args.old, args.new, "--triton", args.triton,
                        "--child", out], env=env, cwd=os.path.abspath(tree), check=True)
        stats[side] = [(os.path.basename(f)[3:-6], sass_stats(f, cuobjdump))
                       for f in sorted(glob.glob(os.path.join(out, "*.cubin")))]
    if len(stats["old"]) != len(stats["new"]):
        print(f"launch counts differ: old {len(stats['old'])}, new {len(stats['new'])}; rows pair by order")
    print(f"{'#':>2} {'old kernel':28} {'instr':>6} {'regs':>5}  loops        | {'new kernel':28} {'instr':>6} "
          f"{'regs':>5}  loops")
    for i, ((name_a, a), (name_b, b)) in enumerate(zip(stats["old"], stats["new"])):
        mark = "" if _close(a, b) else "  <- differs"
        print(f"{i:2d} {name_a[:28]:28} {a['instructions']:6d} {a['registers']:5d}  {str(a['loops']):12} | "
              f"{name_b[:28]:28} {b['instructions']:6d} {b['registers']:5d}  {b['loops']}{mark}")
    with open(os.path.join(args.out, "sass.json"), "w") as f:
        json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()

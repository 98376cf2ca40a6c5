"""The decode path's Triton kernels compiled for sm_90 (H100/H200) on this CPU machine, with
programmatic dependent launch on as a Hopper card runs them: what each kernel's PTX holds of
griddepcontrol and of atomics' memory order.

Run as `python -m tests.kernels.ptx_cases` (test_ptx.py does so in a subprocess: the compile
replaces Triton's driver for the rest of the process). Prints one JSON object per kernel launch.
"""
import json
import re

import torch

from benchmarks.compare_sass import compiled_launches

BF = torch.bfloat16


def _launches() -> None:
    from kernels.moe import launch
    from kernels.moe.dense_gemm import dense_lora_gemm
    from kernels.moe.dense_launch import dense_layout, lora_group_triton_
    from kernels.weights import DenseLoRAGroup, MoELoRAWeights
    t, e, k, d, inter, s, r = 64, 8, 2, 256, 128, 4, 16
    lora = MoELoRAWeights(torch.empty(s, e, 2 * r, d, dtype=BF), torch.empty(s, e, 2 * inter, r, dtype=BF),
                          torch.empty(s, e, r, inter, dtype=BF), torch.empty(s, e, d, r, dtype=BF),
                          torch.full((s,), r, dtype=torch.int32))
    slots = torch.zeros(t, dtype=torch.int32)
    # a decode step's MoE layer on the row path: base GEMMs, gate/up rows, activation + down
    # shrink, top-k sum + down expand
    launch.fused_moe_triton(torch.empty(t, d, dtype=BF), torch.empty(e, 2 * inter, d, dtype=BF),
                            torch.empty(e, d, inter, dtype=BF), torch.empty(t, k), torch.zeros(t, k, dtype=torch.int32),
                            lora, slots, path="rows")
    sections = (256, 128, 128)
    group = DenseLoRAGroup(torch.empty(s, 3 * r, d, dtype=BF), torch.empty(s, sum(sections), r, dtype=BF),
                           torch.full((3, s), r, dtype=torch.int32), sections)
    # q/k/v at decode size (the fused launch), then above it (shrink and expand after cuBLAS)
    dense_lora_gemm(torch.empty(t, d, dtype=BF), torch.empty(sum(sections), d, dtype=BF), None, group, slots, None,
                    k_slices_=2)
    big = torch.zeros(200, dtype=torch.int32)
    lora_group_triton_(torch.empty(200, d, dtype=BF), torch.empty(200, sum(sections), dtype=BF), group,
                       dense_layout(big, s), pdl_early=True)


def main() -> None:
    for name, kernel in compiled_launches(_launches, pdl=True):
        ptx = kernel.asm["ptx"]
        # atomics, reductions (an atomic whose result is unused) and ordered loads (an atomic add of
        # 0 with acquire order becomes one)
        atoms = [line.strip() for line in ptx.splitlines()
                 if re.match(r"\s*(@%p\d+\s+)?(atom|red)\.", line) or re.search(r"\bld\.\S*acquire", line)]
        print(json.dumps({"name": name, "wait": "griddepcontrol.wait" in ptx,
                          "trigger": "griddepcontrol.launch_dependents" in ptx, "atoms": atoms}), flush=True)


if __name__ == "__main__":
    main()

"""Programmatic dependent launch (PDL, Hopper and later) for the LoRA launches of a decode step.

Why: at decode size a LoRA launch is a chain of dependent loads (slot, expert, factor offset, then
the adapter's A and B from DRAM) that starts only once the launch before it has drained. With PDL a
launch's programs are placed on the SMs while the launch before it still runs: they read what
existed before that launch (the layer's input, the routing, the adapters' weights), then wait for
it (`griddepcontrol.wait`) before they read its output or write anything. The base MoE GEMM lets
its dependents in as soon as each of its programs has started, so the LoRA launch after it runs
beside the GEMM's last wave instead of after it.

A kernel launched with PDL here takes PDL as a compile-time value:
- PDL_OFF: no PDL (the interpreter and cards before Hopper have no griddepcontrol);
- PDL_WAIT_FIRST: its programs wait for the launch ahead before anything else: the launch's own
  latency is hidden, nothing more. Safe after any launch.
- PDL_READ_AHEAD: its programs read their inputs and compute beside the launch ahead, and wait
  before they read that launch's output or write anything. Only where the launch ahead writes
  none of those inputs: the caller says so (`pdl_early=True`), e.g. the LoRA launch right after
  the base GEMM that reads the same activations.
In both, every program waits before it exits, even one with nothing to do, so that the launch's
end implies the end of the one ahead of it (a PDL launch after it relies on that), and nothing is
written before the wait (the launch ahead may still read that memory). One exception, by the
caller's word: the MoE row launch writing its delta into a buffer of its own (lora_rows_'s `into`)
writes it before the wait, where the launch ahead is no PDL launch (so nothing before that one
still runs) and touches nothing of the buffer.

MOEPLEX_PDL=0 switches PDL off for A/B runs (benchmarks/bench_engine.py's mode fused_no_pdl sets
ENABLED instead).
"""
import functools
import os

import torch

ENABLED = os.environ.get("MOEPLEX_PDL", "1") != "0"
PDL_OFF, PDL_WAIT_FIRST, PDL_READ_AHEAD = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether launches on this device use PDL: CUDA, compute capability 9.0 or later, ENABLED, and
    not under Triton's interpreter (which has no griddepcontrol)."""
    if not (ENABLED and device.type == "cuda") or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device, early: bool = False) -> dict:
    """Launch keywords of a kernel with a PDL flag: the flag (PDL_READ_AHEAD where `early`, the
    caller's word that the launch ahead writes none of this one's inputs; PDL_WAIT_FIRST otherwise),
    and Triton's launch_pdl with it."""
    if not use_pdl(device):
        return {"PDL": PDL_OFF}
    return {"PDL": PDL_READ_AHEAD if early else PDL_WAIT_FIRST, "launch_pdl": True}

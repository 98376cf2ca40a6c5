"""What the decode path's kernels hold once compiled for sm_90 with programmatic dependent launch
(kernels/pdl.py), checked on CPU: ptx_cases.py compiles them in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

from tests.kernels.interp import REPO

# launched with PDL: each must wait for the launch ahead before it reads that launch's output
WAITERS = {"_lora_rows_kernel", "_silu_mul_shrink_kernel", "_topk_sum_kernel", "_lora_shrink_kernel",
           "_lora_expand_tiles_kernel", "_dense_lora_gemm_kernel"}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEPLEX_TRITON")}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.ptx_cases"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_launched_with_pdl_waits_for_the_launch_ahead(compiled):
    names = {k["name"] for k in compiled}
    assert WAITERS <= names, f"not compiled: {WAITERS - names}"
    assert all(k["wait"] for k in compiled if k["name"] in WAITERS), \
        [k["name"] for k in compiled if k["name"] in WAITERS and not k["wait"]]


def test_the_base_moe_gemm_lets_its_dependents_start(compiled):
    gemms = [k for k in compiled if k["name"] == "_moe_gemm_kernel"]
    assert gemms and all(k["trigger"] for k in gemms)


def test_the_fused_dense_launch_counts_with_release_and_waits_with_acquire(compiled):
    """The shrink programs' count is a release and the wait's reads acquires (the deltas then read
    partial sums other programs stored); a relaxed count would let a tile read stale sums."""
    fused = [k for k in compiled if k["name"] == "_dense_lora_gemm_kernel"]
    assert fused
    atoms = fused[0]["atoms"]
    assert any("release" in a and ".add" in a for a in atoms), atoms  # the shrink programs' count
    assert any("ld." in a and "acquire" in a for a in atoms), atoms  # the wait's read

"""The engine over the Triton kernels (interpreter on CPU, fp32): a mixed step vs the reference.

Runs in a subprocess because MOEPLEX_TRITON / TRITON_INTERPRET must be set before triton loads.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys
from engine import LoRARequest
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import make_engine, step_logits, wait_for_adapters
ckpt, per_expert, fused, prefill_kernel, layout, unit = sys.argv[1:7]
engine = make_engine(ckpt, max_loras=2, max_lora_rank=16, triton_prefill_attention=prefill_kernel == "1",
                     lora_layout=layout, lora_rank_unit=int(unit))
requests = [None, LoRARequest("t1/a", per_expert), LoRARequest("t2/b", fused)]
wait_for_adapters(engine, requests)
prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
errors = []
for mine, prompt, adapter in zip(step_logits(engine, prompts, requests), prompts, [None, per_expert, fused]):
    ref = reference_logits(load_reference_model(ckpt, adapter), prompt)
    errors.append(((mine - ref).abs().max() / ref.abs().max()).item())
print(json.dumps(errors))
"""


@pytest.mark.parametrize("prefill_kernel,layout,unit", [(False, "slots", 16), (True, "slots", 16), (True, "bytes", 16),
                                                       (True, "bytes", 8)],
                         ids=["sdpa_prefill", "triton_prefill", "triton_prefill_adapter_heap",
                              "triton_prefill_adapter_heap_rank_unit_8"])
def test_engine_on_triton_interpreter_matches_reference(checkpoints, adapters, prefill_kernel, layout, unit):
    env = {**os.environ, "MOEPLEX_TRITON": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    fam = "qwen3_moe"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoints[fam]), str(adapters[fam]["a"]),
                           str(adapters[fam]["b"]), str(int(prefill_kernel)), layout, str(unit)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 3 and max(errors) < 1e-4, errors

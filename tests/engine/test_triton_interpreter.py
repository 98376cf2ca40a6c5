"""The engine over the Triton kernels (interpreter on CPU, fp32): a mixed step vs the reference.

Each config's engine runs in a subprocess, all at once (tests.engine.helpers.interpreter_scripts).
"""
import pytest

from tests.engine.helpers import interpreter_scripts

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


# the engine configs: Triton or SDPA prefill attention, the adapters as padded slots or on the heap
CONFIGS = {"sdpa_prefill": (False, "slots", 16), "triton_prefill": (True, "slots", 16),
           "triton_prefill_adapter_heap": (True, "bytes", 16),
           "triton_prefill_adapter_heap_rank_unit_8": (True, "bytes", 8)}


@pytest.fixture(scope="module")
def errors_by_config(checkpoints, adapters) -> dict[str, list[float]]:
    """Each config's three relative logit errors, the configs' engines run at once."""
    fam = "qwen3_moe"
    args = [str(checkpoints[fam]), str(adapters[fam]["a"]), str(adapters[fam]["b"])]
    argvs = [args + [str(int(prefill_kernel)), layout, str(unit)] for prefill_kernel, layout, unit in CONFIGS.values()]
    return dict(zip(CONFIGS, interpreter_scripts(SCRIPT, argvs)))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_on_triton_interpreter_matches_reference(errors_by_config, config):
    errors = errors_by_config[config]
    assert len(errors) == 3 and max(errors) < 1e-4, errors

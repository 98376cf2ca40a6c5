"""bf16 parity of one mixed-tenant step against the fp32 transformers + PEFT oracle.

Shared by the CPU test (torch references in bf16) and the GPU test (Triton kernels in bf16).
The measure is METHOD.md's: ||out - ref|| / ||ref|| per sequence, within 2e-2 for bf16.
"""
from engine import LoRARequest
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import MIXED_PROMPTS, make_engine, step_logits, wait_for_adapters

NAMES = [None, "a", None, "b", "c"]


def mixed_step_errors(ckpt, adapters, device: str, dtype: str = "bfloat16", lora_layout: str = "slots",
                      rank_unit: int = 16) -> list[float]:
    engine = make_engine(ckpt, max_loras=4, max_lora_rank=16, device=device, dtype=dtype, lora_layout=lora_layout,
                         lora_rank_unit=rank_unit)
    requests = [None if n is None else LoRARequest(f"tenant-{n}/ad@v1", str(adapters[n])) for n in NAMES]
    wait_for_adapters(engine, requests)
    errors = []
    for mine, prompt, name in zip(step_logits(engine, MIXED_PROMPTS, requests), MIXED_PROMPTS, NAMES):
        ref = reference_logits(load_reference_model(ckpt, None if name is None else adapters[name]), prompt)
        errors.append(((mine.float().cpu() - ref).norm() / ref.norm()).item())
    engine.shutdown()
    return errors

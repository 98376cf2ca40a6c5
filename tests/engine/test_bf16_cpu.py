"""The bf16 path of the engine on CPU (torch references), against the fp32 oracle."""
import pytest

from tests.engine.bf16_parity import mixed_step_errors
from engine.testing import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout,unit", [("slots", 16), ("bytes", 16), ("bytes", 8)])
def test_cpu_bf16_mixed_step_matches_reference(family, layout, unit, bf16_models):
    ckpt, adapters = bf16_models[family]
    errors = mixed_step_errors(ckpt, adapters, "cpu", lora_layout=layout, rank_unit=unit)
    assert max(errors) <= 2e-2, errors
    assert min(errors) > 0  # it really ran in bf16

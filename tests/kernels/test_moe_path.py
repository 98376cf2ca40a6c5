"""Which path the MoE LoRA delta takes (kernels.moe.launch.lora_path): the rank slices at one token,
the in-place row path up to ROWS_MAX_ROWS routed rows, the split path past them and wherever a
row's expand is too long (Mixtral's 2I = 28672)."""
from kernels.moe import launch


def test_one_token_takes_the_rank_slices_and_a_decode_batch_the_in_place_rows(monkeypatch):
    monkeypatch.setattr(launch, "ROWS_AUTO", "rows-inplace")
    assert launch.lora_path(1, 8, 768) == "rows"
    assert launch.lora_path(2, 8, 768) == launch.lora_path(64, 8, 768) == "rows-inplace"
    assert launch.lora_path(launch.ROWS_MAX_ROWS // 8, 8, 768) == "rows-inplace"
    assert launch.lora_path(launch.ROWS_MAX_ROWS // 8 + 1, 8, 768) == "split"


def test_a_long_expand_takes_the_split_path_even_at_one_token():
    assert launch.lora_path(1, 2, 14336) == launch.lora_path(8, 2, 14336) == "split"


def test_the_environment_switch_puts_every_decode_size_on_the_rank_slices(monkeypatch):
    monkeypatch.setattr(launch, "ROWS_AUTO", "rows")
    assert launch.lora_path(1, 8, 768) == launch.lora_path(64, 8, 768) == "rows"

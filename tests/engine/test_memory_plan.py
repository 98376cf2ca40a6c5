"""The GPU memory split between KV blocks and adapter slots (engine.memory), on H200-like numbers,
and the byte counts it uses against what the runner really allocates (CPU)."""
import logging

import pytest
import torch

from engine import EngineConfig
from engine.errors import EngineError, InvalidRequestError
from engine.lora.slots import SlotPools
from engine.memory import GIB, MemorySettings, heap_bytes, kv_block_bytes, lora_slot_bytes, split_memory
from engine.model_runner import STARTUP_PARTS
from engine.models.loader import load_model
from engine.models.spec import ModelSpec, load_spec
from engine.testing import FAMILIES
from tests.engine.helpers import make_engine

# Qwen3-30B-A3B (its config.json): 48 layers, D 2048, 32 query / 4 KV heads of 128, 128 experts of I 768
QWEN3_30B = ModelSpec(family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
                      num_kv_heads=4, head_dim=128, num_experts=128, top_k=8, moe_intermediate_size=768,
                      intermediate_size=6144, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=40960, norm_topk_prob=True)
# K and V of 16 tokens x 4 heads x 128 in bf16, over 48 layers
BLOCK = 2 * 48 * 16 * 4 * 128 * 2
# per layer at rank 16: q A [16, 2048] + B [4096, 16], k and v A [16, 2048] + B [512, 16] each,
# o A [16, 4096] + B [2048, 16]; experts gate/up A [128, 32, 2048] + B [128, 1536, 16],
# down A [128, 16, 768] + B [128, 2048, 16]; bf16
SLOT = 48 * 2 * (16 * (2048 + 4096) + 2 * 16 * (2048 + 512) + 16 * (4096 + 2048)
                 + 128 * (32 * 2048 + 1536 * 16 + 16 * 768 + 2048 * 16))
TOTAL, WEIGHTS, RESERVE = 139 * GIB, 61 * 10**9, 4 * GIB
BUDGET = int(0.9 * TOTAL) - WEIGHTS - RESERVE  # ~64.3 GiB


def settings(max_model_len=2048, max_num_seqs=64, max_loras=None, num_kv_blocks=None, fraction=None):
    return MemorySettings(0.9, -(-max_model_len // 16), max_num_seqs, max_loras, num_kv_blocks, fraction)


def split(allocated=WEIGHTS, **kw) -> tuple[int, int]:
    return split_memory(TOTAL, allocated, RESERVE, BLOCK, SLOT, settings(**kw))


def test_qwen3_30b_byte_counts_match_the_layout_by_hand():
    assert lora_slot_bytes(QWEN3_30B, 16, torch.bfloat16) == SLOT == 1_687_683_072  # ~1.69 GB
    assert kv_block_bytes(QWEN3_30B, 16, torch.bfloat16) == BLOCK


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,rank", [(torch.float32, 8), (torch.bfloat16, 16)])
@pytest.mark.parametrize("layout", ["slots", "bytes"])
def test_slot_bytes_equal_what_slot_pools_allocates(family, dtype, rank, layout, checkpoints):
    """The heap's experts at rank 8 take r16 = 16: its largest image is larger than a padded slot."""
    spec = load_spec(checkpoints[family])
    model = load_model(spec, None, torch.device("cpu"), dtype, "dummy", 0)
    pools = SlotPools(model, 3, rank, layout=layout)
    assert lora_slot_bytes(spec, rank, dtype, layout) * 3 == pools.storage.numel() * pools.storage.element_size()
    assert (lora_slot_bytes(spec, rank, dtype, "bytes") > lora_slot_bytes(spec, rank, dtype)) == (rank == 8)


@pytest.mark.parametrize("layout", ["slots", "bytes"])
def test_slot_bytes_skip_dense_mlp_layers(tmp_path, layout):
    from engine.testing.checkpoints import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(tmp_path / "ck", "qwen3_moe", seed=3, num_hidden_layers=3, mlp_only_layers=[1])
    spec = load_spec(ckpt)
    pools = SlotPools(load_model(spec, None, torch.device("cpu"), torch.float32, "dummy", 0), 1, 4, layout=layout)
    assert spec.dense_layers == (1,) and lora_slot_bytes(spec, 4, torch.float32, layout) == pools.storage.numel() * 4


def test_default_split_gives_kv_for_every_sequence_then_slots_the_rest():
    # 64 sequences x 128 blocks = 12.9 GB, under half the budget; 33 slots of 1.69 GB in the rest
    assert split() == (64 * 128, (BUDGET - 64 * 128 * BLOCK) // SLOT) == (8192, 33)


def test_long_context_caps_kv_at_half_the_budget_and_gives_back_what_slots_leave():
    kv, slots = split(max_model_len=32768)
    assert slots == (BUDGET - (BUDGET // 2) // BLOCK * BLOCK) // SLOT == 20
    assert kv == (BUDGET - slots * SLOT) // BLOCK > (BUDGET // 2) // BLOCK  # the leftover went back


def test_slots_are_at_most_max_num_seqs():
    assert split(max_num_seqs=8) == (8 * 128, 8)


def test_explicit_max_loras_fixes_the_slots_and_kv_takes_the_rest():
    assert split(max_loras=4) == (8192, 4)  # the KV cache is still capped at what 64 sequences need
    assert split(max_model_len=32768, max_loras=30) == ((BUDGET - 30 * SLOT) // BLOCK, 30)


def test_explicit_num_kv_blocks_fixes_the_kv_cache_and_slots_take_the_rest():
    assert split(num_kv_blocks=20000) == (20000, (BUDGET - 20000 * BLOCK) // SLOT) == (20000, 22)
    assert split(num_kv_blocks=20000, max_loras=2) == (20000, 2)


def test_max_loras_zero_gives_the_kv_cache_everything():
    assert split(max_loras=0) == (8192, 0)
    assert split(max_model_len=32768, max_loras=0) == (BUDGET // BLOCK, 0)


def test_lora_memory_fraction_gives_the_slots_that_share():
    assert split(fraction=0.25) == (8192, int(0.25 * BUDGET) // SLOT) == (8192, 10)


def test_the_heap_takes_what_the_capped_kv_cache_leaves_and_padded_slots_whole_images():
    # rank 64: 6.75 GB images; 64 sequences of 2576 tokens cap the KV cache at 10304 blocks
    slot64 = 4 * (SLOT - 48 * 2 * 16 * (2 * (2048 + 4096) + 2 * (2048 + 512))) + 48 * 2 * 64 * (
        2 * (2048 + 4096) + 2 * (2048 + 512))
    kv, images = split_memory(TOTAL, WEIGHTS, RESERVE, BLOCK, slot64, settings(max_model_len=2576))
    assert kv == 64 * 161 and images == (BUDGET - kv * BLOCK) // slot64 == 7
    idle = BUDGET - kv * BLOCK - images * slot64
    assert idle > 5 * GIB  # what whole images left unused beside the capped KV cache
    rest = BUDGET - kv * BLOCK
    assert heap_bytes(BUDGET, kv, BLOCK, images, slot64, "bytes", 64, True) == rest
    assert heap_bytes(BUDGET, kv, BLOCK, images, slot64, "slots", 64, True) == images * slot64
    assert heap_bytes(BUDGET, kv, BLOCK, 0, slot64, "bytes", 0, True) == 0  # max_loras=0: no adapters
    # the operator sized the adapters' side (max_loras, lora_memory_fraction): as sized
    assert heap_bytes(BUDGET, kv, BLOCK, images, slot64, "bytes", images, False) == images * slot64
    # never more than the slots can hold
    assert heap_bytes(BUDGET, kv, BLOCK, 1, slot64, "bytes", 2, True) == 2 * slot64 < rest
    # an explicit num_kv_blocks past the budget's share still leaves the images their room
    assert heap_bytes(BUDGET, 10**6, BLOCK, 2, slot64, "bytes", 64, True) == 2 * slot64


def test_too_little_memory_for_one_sequence_is_a_clear_error():
    with pytest.raises(EngineError, match="fewer than the 2048 one max_model_len sequence needs"):
        split(allocated=119 * GIB, max_model_len=32768)  # 2.1 GiB left, one sequence needs 3 GiB
    with pytest.raises(EngineError, match="max_model_len"):
        split(max_model_len=32768, max_loras=40)  # 40 slots leave 1.4 GiB


def test_room_for_one_sequence_but_no_slot_is_a_clear_error():
    # 4.1 GiB left: one 32k sequence (3 GiB) fits, a 1.57 GiB slot beside it does not
    with pytest.raises(EngineError, match="max_loras=0"):
        split(allocated=117 * GIB, max_model_len=32768)
    assert split(allocated=117 * GIB, max_model_len=32768, max_loras=0) == (
        (int(0.9 * TOTAL) - 117 * GIB - RESERVE) // BLOCK, 0)


def test_config_defaults_resolve_per_device(checkpoints):
    cpu = EngineConfig(model=checkpoints["qwen3_moe"])
    cuda = EngineConfig(model=checkpoints["qwen3_moe"], device="cuda")
    assert (cpu.max_loras, cpu.max_cpu_loras, cpu.prefill_graphs, cpu.triton_prefill_attention) == (4, 16, False, False)
    assert (cuda.max_loras, cuda.max_cpu_loras, cuda.prefill_graphs, cuda.triton_prefill_attention) == (
        None, None, True, True)
    explicit = EngineConfig(model=checkpoints["qwen3_moe"], device="cuda", max_loras=3, prefill_graphs=False)
    assert (explicit.max_loras, explicit.max_cpu_loras, explicit.prefill_graphs) == (3, 12, False)
    assert EngineConfig(model=checkpoints["qwen3_moe"], triton_prefill_attention=True).triton_prefill_attention


@pytest.mark.parametrize("kw", [dict(lora_memory_fraction=1.0), dict(lora_memory_fraction=0.3, max_loras=2),
                                dict(lora_memory_fraction=0.3, num_kv_blocks=64), dict(gpu_memory_utilization=0),
                                dict(max_loras=-1)])
def test_bad_memory_settings_are_rejected(kw, checkpoints):
    with pytest.raises(InvalidRequestError):
        EngineConfig(model=checkpoints["qwen3_moe"], device="cuda", **kw)


def test_runner_allocates_what_its_plan_says_and_times_each_part(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        engine = make_engine(checkpoints["qwen3_moe"], max_loras=None, max_lora_rank=8)
    runner, plan = engine.runner, engine.runner.memory_plan
    assert plan.num_slots == runner.num_lora_slots == runner.slot_pools.num_slots == 4  # CPU default
    assert engine.config.max_cpu_loras == runner.max_cpu_loras == 16
    assert plan.num_kv_blocks == runner.num_kv_blocks == engine.block_manager.num_blocks
    # the KV cache holds one scratch block past the plan's
    assert runner.kv_cache.numel() * runner.kv_cache.element_size() == (plan.num_kv_blocks + 1) * plan.kv_block_bytes
    pools = runner.slot_pools
    assert pools.capacity_bytes == plan.heap_bytes == plan.num_slots * plan.slot_bytes
    # one buffer: the heap, then the KV cache with its scratch block
    assert pools.storage.data_ptr() == runner.arena.data_ptr()
    assert runner.arena.numel() * 4 == plan.heap_bytes + (plan.num_kv_blocks + 1) * plan.kv_block_bytes
    assert runner.kv_cache.data_ptr() == runner.arena[pools.heap_numel:].data_ptr()
    assert plan.weights_bytes == sum(p.numel() * 4 for p in runner.model.parameters())
    assert tuple(runner.startup_seconds) == STARTUP_PARTS
    assert runner.startup_seconds["weights"] > 0
    assert all(runner.startup_seconds[p] == 0.0 for p in ("prefill_graphs", "decode_graphs", "warmup"))
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("memory plan: weights") and "adapter heap" in m and "over 4 slots" in m
               for m in lines) == 1  # the default layout: a heap of 4 max-rank adapters' bytes
    assert sum(m.startswith("start-up took") for m in lines) == 1


def test_max_loras_zero_allocates_no_slots(checkpoints):
    runner = make_engine(checkpoints["qwen3_moe"], max_loras=0).runner
    assert runner.slot_pools is None and runner.memory_plan.num_slots == 0 and runner.max_cpu_loras == 4

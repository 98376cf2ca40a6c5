"""The adapter heap: each adapter packed once into an image of its own bytes (its targets at its
ranks), placed anywhere in the heap with one copy, and read back through its slot's offsets."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from engine.lora.adapter import load_adapter
from tests.engine.helpers import make_engine

FAMILY = "qwen3_moe"


class InPlaceOps(TorchFunctionMode):
    """Records every in-place tensor op (name ending in "_") issued while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            self.calls.append((name, args))
        return func(*args, **(kwargs or {}))


def _load(engine, adapters, name):
    return load_adapter(name, adapters[FAMILY][name], engine.spec, engine.runner.slot_pools.dtype, 16)


def _holds(view: torch.Tensor, rank: int, expected: torch.Tensor, rank_dim: int) -> bool:
    """view[.., :rank, ..] == expected along rank_dim, and zeros past `rank`."""
    rest = view.narrow(rank_dim, rank, view.shape[rank_dim] - rank)
    return torch.equal(view.narrow(rank_dim, 0, rank), expected) and not rest.any()


def _assert_slot_holds(pools, slot: int, adapter) -> None:
    """Read every factor back through the kernels' pools (offsets of `slot`) and compare."""
    for layer, group in pools.qkv.items():
        for h, name in enumerate(("q_proj", "k_proj", "v_proj")):
            f, proj = adapter.dense.get((layer, name)), group.dense(h)
            rank = 0 if f is None else f.rank
            assert int(group.ranks[h, slot]) == rank, (layer, name)
            if f is not None:
                assert torch.equal(proj.a.view(slot, 0, rank, proj.in_features)[0], f.a)
                assert torch.equal(proj.b.view(slot, 0, proj.out_features, rank)[0], f.b)
    for (layer, name), pool in pools.dense.items():
        f = adapter.dense.get((layer, name))
        assert int(pool.ranks[slot]) == (0 if f is None else f.rank)
        if f is not None:
            assert torch.equal(pool.a.view(slot, 0, f.rank, pool.in_features)[0], f.a)
            assert torch.equal(pool.b.view(slot, 0, pool.out_features, f.rank)[0], f.b)
    for layer, pool in pools.moe.items():
        parts = {m: adapter.moe.get((layer, m)) for m in ("gate", "up", "down")}
        r = max((f.rank for f in parts.values() if f is not None), default=0)
        assert int(pool.ranks[slot]) == r
        d, inter = pool.down_b.shape[2], pool.down_a.shape[3]
        for h, m in enumerate(("gate", "up")):
            f = parts[m]
            if f is not None:
                assert _holds(pool.gate_up_a.view(slot, h, r, d), f.rank, f.a, 1)
                assert _holds(pool.gate_up_b.view(slot, h, inter, r), f.rank, f.b, 2)
        if parts["down"] is not None:
            assert _holds(pool.down_a.view(slot, 0, r, inter), parts["down"].rank, parts["down"].a, 1)
            assert _holds(pool.down_b.view(slot, 0, d, r), parts["down"].rank, parts["down"].b, 2)


@pytest.mark.parametrize("layout", ["bytes", "slots"])
def test_an_image_read_back_through_its_slot_equals_the_adapters_factors(checkpoints, adapters, layout):
    """"c" (rank 16, v_proj 6, down 4) at heap start 0 in slot 1, then "a" (rank 4) at another
    place in the same slot (the padded layout: slot 1's row both times): the slot reads exactly
    a's factors, nothing of c's."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout=layout)
    pools = engine.runner.slot_pools
    pools.storage[:pools.heap_numel].fill_(float("nan"))  # a read outside an image would show
    c, a = _load(engine, adapters, "c"), _load(engine, adapters, "a")
    pools.write(1, 0, pools.pack(_load(engine, adapters, "c")))
    _assert_slot_holds(pools, 1, c)
    start = pools.heap_numel - pools.image_numel(a)
    pools.write(1, start, pools.pack(_load(engine, adapters, "a")))
    _assert_slot_holds(pools, 1, a)
    assert not pools.ranks[:, 0].any()  # the other slot untouched


def test_a_padded_slot_load_is_one_copy_of_a_whole_slot_row_plus_ranks(checkpoints, adapters):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="slots")
    pools = engine.runner.slot_pools
    packed = pools.pack(_load(engine, adapters, "b"))
    assert packed.packed.numel() == pools.max_image_numel == pools.storage.numel() // 2
    with InPlaceOps() as ops:
        pools.write(1, 0, packed)
    assert [name for name, _ in ops.calls] == ["copy_", "copy_"]
    (_, (dst, src)), (_, (rank_dst, _)) = ops.calls
    assert src is packed.packed and dst.data_ptr() == pools.storage[pools.max_image_numel:].data_ptr()
    assert rank_dst.numel() == len(pools.plan)


def test_a_load_is_one_copy_of_the_image_plus_its_offsets_and_ranks(checkpoints, adapters):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes")
    pools = engine.runner.slot_pools
    packed = pools.pack(_load(engine, adapters, "b"))
    assert packed.dense == {} and packed.moe == {}  # factors dropped: one host buffer per adapter
    for start in (0, 48):  # a reload issues the same single copy, wherever the image goes
        with InPlaceOps() as ops:
            pools.write(0, start, packed)
        assert [name for name, _ in ops.calls] == ["copy_", "copy_", "add_", "copy_"]
        (_, (dst, src)), (_, (offsets_dst, _)), _, (_, (rank_dst, _)) = ops.calls
        assert dst.numel() == packed.packed.numel() and src is packed.packed
        # the plan's ranks, then each MoE layer's two shareable halves' rank tables
        assert offsets_dst.numel() == len(pools.rows) and rank_dst.numel() == len(pools.plan) + 2 * len(pools.moe)
        assert int(pools.offsets[:, 0].min()) * 16 >= start  # offsets count 16-element units


@pytest.mark.parametrize("unit", [16, 8])
def test_images_take_their_adapters_own_bytes(checkpoints, adapters, unit):
    """Rank-4 "a" (every target), rank-8 "b": an image holds each attention factor at its rank
    and each MoE layer's experts at the layer's rank rounded up to the rank unit (16, or 8: "b"'s
    experts then take half the bytes), each factor rounded up to 16 elements (alignment); the
    largest image (rank 16 on every target) is what the memory plan counts per adapter."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes",
                         lora_rank_unit=unit)
    pools = engine.runner.slot_pools
    moe_dims = {key: dims for kind, key, dims in pools.plan if kind == "moe"}
    for name in ("a", "b"):
        factors = _load(engine, adapters, name)
        own = sum(f.a.numel() + f.b.numel() for f in factors.dense.values())
        layers = {layer for layer, _ in factors.moe}
        for layer in layers:
            e, inter, d = moe_dims[layer]
            r16 = -(-max(f.rank for (l, _), f in factors.moe.items() if l == layer) // unit) * unit
            own += r16 * e * 3 * (d + inter)  # gate/up A and B, down A and B
        num_factors = 2 * len(factors.dense) + 4 * len(layers)
        assert own <= pools.image_numel(factors) < own + 16 * num_factors
        assert pools.pack(factors).packed.numel() == pools.image_numel(factors)
    assert pools.slot_bytes == pools.max_image_numel * 4 == engine.runner.memory_plan.slot_bytes
    assert pools.heap_numel == 2 * pools.max_image_numel  # max_loras largest adapters by default


def test_a_shared_outer_adapter_keeps_its_shared_halves_once(checkpoints, tiny_adapter):
    """The same weights as a shared-outer and as a per-expert adapter: the shared-outer image
    holds gate/up A and down B once per layer (E - 1 copies fewer of each), its slot reads every
    expert's factors back equal to the per-expert one's, its shareable rank tables carry the
    layer's rank negated (the kernels' expert stride 0) while the plan's stay positive, and its
    packing (not the per-expert one's) turns the layers' once-a-token path on."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes")
    pools = engine.runner.slot_pools
    unit = engine.config.lora_rank_unit  # the rank-8 adapter's experts take r = 8 at unit 8, 16 at unit 16
    pools.storage[:pools.heap_numel].fill_(float("nan"))
    path = tiny_adapter(FAMILY, "shared_outer", rank=8, alpha=16, seed=21)
    shared = load_adapter("s", path, engine.spec, pools.dtype, 16)
    per_expert = load_adapter("p", path, engine.spec, pools.dtype, 16)
    for f in per_expert.moe.values():
        f.shared = ""
    assert {f.shared for (_, m), f in shared.moe.items()} == {"A", "B"}
    saved = 0
    for kind, layer, dims in pools.plan:
        if kind == "moe" and (layer, "gate") in shared.moe:
            e, _, d = dims
            saved += (e - 1) * unit * (2 * d + d)  # rank 8 at the unit: gate/up A [2, r, D], down B [D, r]
    assert pools.image_numel(per_expert) - pools.image_numel(shared) == saved > 0
    plain = load_adapter("q", path, engine.spec, pools.dtype, 16)  # packing drops its factors: a copy
    for f in plain.moe.values():
        f.shared = ""
    pools.write(0, pools.heap_numel - pools.image_numel(plain), pools.pack(plain))
    assert not any(pool.shared_halves for pool in pools.moe.values())  # per-expert: every row its own shrink
    pools.write(1, 0, pools.pack(shared))
    assert all(pool.shared_halves for pool in pools.moe.values())  # the split path's once-a-token shrink
    _assert_slot_holds(pools, 1, per_expert)
    for layer, pool in pools.moe.items():
        plan_rank = int(pool.ranks[1])
        assert plan_rank == 8
        assert int(pool.gate_up_a.ranks[1]) == int(pool.down_b.ranks[1]) == -plan_rank
        assert int(pool.gate_up_b.ranks[1]) == int(pool.down_a.ranks[1]) == plan_rank


def test_a_shared_down_b_scaled_per_expert_by_an_alpha_pattern_is_kept_per_expert(checkpoints, tiny_adapter):
    """alpha_pattern naming one expert's down_proj scales that expert's copy of the shared B
    (the scale is folded into B): the heap keeps down's B per expert, gate/up's A still once,
    and the slot reads every expert's factors back as loaded."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes")
    pools = engine.runner.slot_pools
    pools.storage[:pools.heap_numel].fill_(float("nan"))
    path = tiny_adapter(FAMILY, "shared_outer", rank=8, alpha=16, seed=24,
                        alpha_pattern={"experts.1.down_proj": 64})
    adapter = load_adapter("s", path, engine.spec, pools.dtype, 16)
    downs = [f for (_, m), f in adapter.moe.items() if m == "down"]
    assert downs and all(f.shared == "" for f in downs)
    assert not all(torch.equal(f.b[1], f.b[0]) for f in downs)  # expert 1's B really differs
    assert {f.shared for (_, m), f in adapter.moe.items() if m != "down"} == {"A"}
    pools.write(0, 0, pools.pack(load_adapter("s", path, engine.spec, pools.dtype, 16)))
    _assert_slot_holds(pools, 0, adapter)
    for pool in pools.moe.values():
        assert int(pool.gate_up_a.ranks[0]) == -8 and int(pool.down_b.ranks[0]) == 8


def attention_only(src, dst):
    """A copy of the PEFT adapter in src with only its attention (q/k/v/o) tensors."""
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items()
               if any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj"))}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config.pop("target_parameters", None)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("kw", [dict(lora_rank_unit=4), dict(lora_rank_unit=32),
                                dict(lora_rank_unit=8, lora_layout="slots")])
def test_a_rank_unit_other_than_16_or_8_on_the_heap_is_refused(checkpoints, kw):
    from engine import EngineConfig
    from engine.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="lora_rank_unit"):
        EngineConfig(model=checkpoints[FAMILY], **kw)


@pytest.mark.parametrize("layout,unit", [("bytes", 8), ("slots", 16)])
def test_the_rank_unit_defaults_to_8_on_the_heap_and_16_in_max_rank_slots(checkpoints, layout, unit):
    from engine import EngineConfig
    assert EngineConfig(model=checkpoints[FAMILY], lora_layout=layout).lora_rank_unit == unit

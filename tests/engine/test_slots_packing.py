"""Slot pools packed per slot: one device row per slot, one host image per adapter, one copy per load."""
import torch
from torch.overrides import TorchFunctionMode

from engine.lora.adapter import LoRAFactors, load_adapter
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


def _engine_and_factors(checkpoints, adapters, name):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16)
    pools = engine.runner.slot_pools
    factors = load_adapter(name, adapters[FAMILY][name], engine.spec, pools.dtype, 16)  # independent copy
    packed = pools.pack(load_adapter(name, adapters[FAMILY][name], engine.spec, pools.dtype, 16))
    return engine, pools, factors, packed


def _assert_padded(pool_part: torch.Tensor, rank_dim: int, rank: int, expected: torch.Tensor) -> None:
    """pool_part[.., :rank, ..] == expected along rank_dim, and zeros beyond `rank`."""
    assert torch.equal(pool_part.narrow(rank_dim, 0, rank), expected)
    rest = pool_part.narrow(rank_dim, rank, pool_part.shape[rank_dim] - rank)
    assert rest.numel() == 0 or not rest.any()


def _assert_slot_holds(pools, slot: int, adapter) -> None:
    r = pools.max_rank
    for key, pool in pools.dense.items():
        f = adapter.dense.get(key)
        rank = 0 if f is None else f.rank
        assert int(pool.ranks[slot]) == rank, key
        if f is None:
            assert not pool.a[slot].any() and not pool.b[slot].any()
            continue
        _assert_padded(pool.a[slot], 0, rank, f.a)
        _assert_padded(pool.b[slot], 1, rank, f.b)
    for layer, pool in pools.moe.items():
        gate, up, down = (_or_empty(adapter.moe.get((layer, m)), pool) for m in ("gate", "up", "down"))
        inter = pool.down_a.shape[3]
        _assert_padded(pool.gate_up_a[slot, :, :r], 1, gate.rank, gate.a)
        _assert_padded(pool.gate_up_a[slot, :, r:], 1, up.rank, up.a)
        _assert_padded(pool.gate_up_b[slot, :, :inter], 2, gate.rank, gate.b)
        _assert_padded(pool.gate_up_b[slot, :, inter:], 2, up.rank, up.b)
        _assert_padded(pool.down_a[slot], 1, down.rank, down.a)
        _assert_padded(pool.down_b[slot], 2, down.rank, down.b)
        assert int(pool.ranks[slot]) == max(gate.rank, up.rank, down.rank)


def _or_empty(factors, pool):
    """A module the adapter does not target: rank 0 (its pool part must be all zeros)."""
    if factors is not None:
        return factors
    e = pool.down_a.shape[1]
    return LoRAFactors(pool.down_a.new_zeros(e, 0, 1), pool.down_a.new_zeros(e, 1, 0))


def test_every_pool_is_a_view_into_one_row_per_slot(checkpoints):
    pools = make_engine(checkpoints[FAMILY], max_loras=3, max_lora_rank=8).runner.slot_pools
    base, row = pools.storage.data_ptr(), pools.slot_numel * pools.storage.element_size()
    tensors = [t for p in pools.dense.values() for t in (p.a, p.b)]
    tensors += [t for p in pools.moe.values() for t in (p.gate_up_a, p.gate_up_b, p.down_a, p.down_b)]
    assert sum(t[0].numel() for t in tensors) == pools.slot_numel  # the row is exactly the pools' slot 0
    for t in tensors:
        assert t.untyped_storage().data_ptr() == pools.storage.untyped_storage().data_ptr()
        assert t.stride(0) == pools.slot_numel and t[0].is_contiguous()
        assert base <= t.data_ptr() and t[0].data_ptr() + t[0].nbytes <= base + row
    ranks = [p.ranks for p in (*pools.dense.values(), *pools.moe.values())]
    assert all(r.is_contiguous() and r.shape == (3,) for r in ranks)


def test_slot_after_write_equals_factors_with_zero_padding(checkpoints, adapters):
    """Adapter "c" (rank 16, v_proj 6, down 4) then "a" (rank 4) into the same slot: the slot
    holds exactly a's factors, zeros beyond each module's rank (nothing left over from c)."""
    engine, pools, factors_a, packed_a = _engine_and_factors(checkpoints, adapters, "a")
    factors_c = load_adapter("c", adapters[FAMILY]["c"], engine.spec, pools.dtype, 16)
    pools.write(1, pools.pack(load_adapter("c", adapters[FAMILY]["c"], engine.spec, pools.dtype, 16)))
    _assert_slot_holds(pools, 1, factors_c)
    pools.write(1, packed_a)
    _assert_slot_holds(pools, 1, factors_a)
    assert not pools.storage[0].any() and not pools.ranks[:, 0].any()  # the other slot untouched


def test_a_slot_load_is_one_copy_plus_ranks(checkpoints, adapters):
    _, pools, _, packed = _engine_and_factors(checkpoints, adapters, "b")
    assert packed.dense == {} and packed.moe == {}  # factors dropped: one host buffer per adapter
    assert packed.packed.numel() == pools.slot_numel and packed.num_bytes == pools.slot_bytes + 4 * len(pools.plan)
    for _ in range(2):  # a reload issues the same single copy
        with InPlaceOps() as ops:
            pools.write(0, packed)
        assert [name for name, _ in ops.calls] == ["copy_", "copy_"]
        (_, (dst, src)), (_, (rank_dst, _)) = ops.calls
        assert dst.numel() == pools.slot_numel and src is packed.packed
        assert rank_dst.numel() == len(pools.plan)


def test_unpacked_factors_load_through_a_temporary_image(checkpoints, adapters):
    """A hand-built adapter (factors only, as the benchmark makes them) still loads, and is left
    unpacked (adapters sharing its factor dicts do not each keep an image)."""
    engine, pools, factors, _ = _engine_and_factors(checkpoints, adapters, "a")
    unpacked = load_adapter("a", adapters[FAMILY]["a"], engine.spec, pools.dtype, 16)
    pools.write(0, unpacked)
    assert unpacked.packed is None and unpacked.dense.keys() == factors.dense.keys()
    _assert_slot_holds(pools, 0, factors)
    twin = pools.pack(unpacked).renamed("a-twin")
    assert twin.packed is unpacked.packed and twin.name == "a-twin"


def test_host_tier_holds_one_packed_buffer_per_adapter(checkpoints, adapters):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16)
    manager = engine.lora_manager
    adapter = manager._load_to_host("b", str(adapters[FAMILY]["b"]))
    assert adapter.dense == {} and adapter.moe == {}
    assert adapter.packed.shape == (manager.pools.slot_numel,) and adapter.packed_ranks.dtype == torch.int32
    assert adapter.max_rank == 8

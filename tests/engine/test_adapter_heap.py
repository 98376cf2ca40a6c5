"""Adapters resident by bytes: small adapters share a heap that one large adapter fills; the
least recently used unreferenced adapters make room, referenced ones never; numerics hold with
adapters placed anywhere in a NaN-poisoned heap, at ranks whose experts take r16 > rank."""
import time

import pytest
import torch

from engine.sequence import LoRARequest
from engine.testing.adapters import make_peft_adapter
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import MIXED_PROMPTS, assert_close, make_engine, step_logits, wait_for_adapters
from tests.engine.test_slots_packing import attention_only

FAMILY = "qwen3_moe"


def _reserve(manager, name: str, path) -> int:
    """A slot holding `name`, its reference taken, once its copy is done (loads run on threads)."""
    deadline = time.monotonic() + 30
    while (slot := manager.reserve(name, str(path))) is None:
        assert time.monotonic() < deadline, f"{name} never got a slot"
        time.sleep(0.01)
    while not manager.is_ready(slot):
        time.sleep(0.01)
    return slot


@pytest.fixture
def attention_b(adapters, tmp_path):
    """Rank-8 adapter "b" on q/k/v/o only."""
    return attention_only(adapters[FAMILY]["b"], tmp_path / "b-attention")


def test_a_rank8_attention_only_adapter_occupies_its_own_bytes(checkpoints, attention_b):
    """A heap of one largest image (rank 16, every target) holds eight rank-8 attention-only
    adapters at once, each taking its own bytes on the device and in the host tier."""
    probe = make_engine(checkpoints[FAMILY], max_loras=1, max_lora_rank=16, lora_layout="bytes")
    engine = make_engine(checkpoints[FAMILY], max_loras=8, max_lora_rank=16, lora_layout="bytes",
                         lora_heap_bytes=probe.runner.slot_pools.slot_bytes)
    manager, pools = engine.lora_manager, engine.runner.slot_pools
    slots = [_reserve(manager, f"t{i}/att@v1", attention_b) for i in range(8)]
    image = manager.host["t0/att@v1"].packed
    assert len(set(slots)) == 8 and len(manager.resident()) == 8
    assert manager.heap_bytes_used == 8 * image.nbytes <= pools.capacity_bytes
    s = engine.spec
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    own = s.num_layers * 8 * ((s.hidden_size + q) + 2 * (s.hidden_size + kv) + (q + s.hidden_size))
    assert own <= image.numel() < own + 16 * 8 * s.num_layers  # rank 8 on q/k/v/o (16-aligned), no experts
    assert 8 * image.nbytes < pools.slot_bytes  # as max-rank slots, one would fill the heap
    assert manager.host_bytes_used == sum(a.num_bytes for a in manager.host.values())
    stats = engine.stats()
    assert stats["lora_heap_bytes_used"] == manager.heap_bytes_used
    assert stats["lora_heap_bytes"] == pools.capacity_bytes


def test_least_recently_used_unreferenced_adapters_make_room_referenced_ones_never(
        checkpoints, adapters, attention_b):
    """A heap full of small adapters: a larger one waits while they are all referenced; once
    released, the least recently used go first, only as many as its image needs."""
    probe = make_engine(checkpoints[FAMILY], max_loras=1, max_lora_rank=16, lora_layout="bytes")
    engine = make_engine(checkpoints[FAMILY], max_loras=16, max_lora_rank=16, lora_layout="bytes",
                         lora_heap_bytes=probe.runner.slot_pools.slot_bytes)
    manager, pools = engine.lora_manager, engine.runner.slot_pools
    small, held = [], []
    while manager.spans.can_allocate(pools.image_numel(manager.host.get("t0/att@v1") or _factors(engine, attention_b))):
        small.append(f"t{len(small)}/att@v1")
        held.append(_reserve(manager, small[-1], attention_b))
    assert len(small) >= 4 and len(manager.resident()) == len(small)
    path_a = str(adapters[FAMILY]["a"])
    deadline = time.monotonic() + 30
    while manager.reserve("a", path_a) is None and not manager.waits_for_slot("a"):
        assert time.monotonic() < deadline
        manager.collect_loads()
        time.sleep(0.01)
    assert manager.waits_for_slot("a") and set(manager.resident()) == set(small)  # nothing evicted
    for slot in held:  # released in load order: t0 is the least recently used
        manager.release(slot)
    slot_a = _reserve(manager, "a", path_a)
    per_small = pools.image_numel(manager.host[small[-1]])
    needed = -(-pools.image_numel(manager.host["a"]) // per_small)
    resident = set(manager.resident())
    assert [n for n in small if n not in resident] == small[:needed]  # oldest first, as few as fit it
    assert manager.resident()["a"] == slot_a


def _factors(engine, path):
    from engine.lora.adapter import load_adapter
    return load_adapter("probe", path, engine.spec, engine.runner.slot_pools.dtype, 16)


def test_mixed_batch_matches_reference_with_adapters_placed_anywhere_in_a_poisoned_heap(
        checkpoints, adapters, attention_b):
    """Loads and evictions move the images around a heap filled with NaN: every sequence's
    logits still equal its own reference model's, and base sequences stay finite."""
    ckpt = checkpoints[FAMILY]
    probe = make_engine(ckpt, max_loras=1, max_lora_rank=16, lora_layout="bytes")
    engine = make_engine(ckpt, max_loras=4, max_lora_rank=16, lora_layout="bytes",
                         lora_heap_bytes=probe.runner.slot_pools.slot_bytes * 3)
    pools = engine.runner.slot_pools
    pools.storage[:pools.heap_numel].fill_(float("nan"))  # the heap's own bytes; the KV cache follows
    manager = engine.lora_manager
    for name in ("x/att@v1", "y/att@v1"):  # take the heap's start, then give it up
        manager.release(_reserve(manager, name, attention_b))
    requests = {n: LoRARequest(f"tenant-{n}/ad@v1", str(adapters[FAMILY][n])) for n in "abc"}
    for n in "cab":
        manager.release(_reserve(manager, requests[n].lora_name, requests[n].lora_path))
    assert len(manager.resident()) >= 3
    names = [None, "a", "b", "c", None]
    logits = step_logits(engine, MIXED_PROMPTS, [None if n is None else requests[n] for n in names])
    for mine, prompt, name in zip(logits, MIXED_PROMPTS, names):
        ref = load_reference_model(ckpt, None if name is None else adapters[FAMILY][name])
        assert_close(mine, reference_logits(ref, prompt))


@pytest.mark.parametrize("unit", [16, 8])
def test_mixed_ranks_match_reference_with_experts_at_their_rank_rounded_up_to_the_rank_unit(checkpoints, tmp_path,
                                                                                           unit):
    """Ranks 8, 24 and 40 (experts at r16 = 16, 32 and 48 with rank unit 16, the last past
    max_lora_rank; at 8, 24 and 40 with rank unit 8) share a NaN-filled heap: each image holds
    exactly its expert blocks at that rank, and every sequence's logits equal its own reference
    model's."""
    ckpt = checkpoints[FAMILY]
    paths = {r: make_peft_adapter(ckpt, tmp_path / f"r{r}", rank=r, fmt="fused" if r == 24 else "per_expert",
                                  alpha=2 * r, seed=20 + r) for r in (8, 24, 40)}
    engine = make_engine(ckpt, max_loras=3, max_lora_rank=40, lora_layout="bytes", lora_rank_unit=unit)
    pools = engine.runner.slot_pools
    pools.storage[:pools.heap_numel].fill_(float("nan"))
    requests = {r: LoRARequest(f"t{r}/ad@v1", str(p)) for r, p in paths.items()}
    wait_for_adapters(engine, list(requests.values()))
    e, inter, d = next(dims for kind, _, dims in pools.plan if kind == "moe")
    num_moe = sum(kind == "moe" for kind, _, _ in pools.plan)
    s = engine.spec
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    for r, request in requests.items():
        own = s.num_layers * r * ((d + q) + 2 * (d + kv) + (q + d))  # q/k/v/o at rank r
        own += num_moe * (-(-r // unit) * unit) * e * 3 * (d + inter)  # gate/up and down A and B at r16
        image = engine.lora_manager.host[request.lora_name].packed
        assert own <= image.numel() < own + 16 * (8 * s.num_layers + 4 * num_moe)  # 16-aligned factors
    names = [None, 8, 24, 40, None]
    loras = [None if r is None else requests[r] for r in names]
    for mine, prompt, r in zip(step_logits(engine, MIXED_PROMPTS, loras), MIXED_PROMPTS, names):
        ref = load_reference_model(ckpt, None if r is None else paths[r])
        assert_close(mine, reference_logits(ref, prompt))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", ["bytes", "slots"])
def test_an_image_written_in_pieces_lands_whole_over_a_poisoned_heap(checkpoints, adapters, layout, device):
    """A slot write in pieces (SlotPools.copy_chunk_bytes, here 13 elements, so the last piece is
    partial; on CUDA two in flight on the side stream) leaves the slot's bytes equal to the
    image: no piece skipped, none past its end."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout=layout, device=device)
    pools, manager = engine.runner.slot_pools, engine.lora_manager
    pools.storage.fill_(float("nan"))
    pools.copy_chunk_bytes = 13 * pools.storage.element_size()
    slot = _reserve(manager, "t/a@v1", adapters[FAMILY]["a"])
    image = manager.host["t/a@v1"].packed
    assert image.numel() > 100 * 13 and image.numel() % 13  # many pieces, the last one short
    if layout == "bytes":
        start, _ = manager.slot_spans[slot]
        written = pools.storage[start:start + image.numel()]
        assert torch.isnan(pools.storage[start + image.numel()]).item()  # nothing past the image
    else:
        written = pools._slot_rows()[slot]
    assert torch.equal(written, image.to(written.device))


@pytest.mark.gpu
def test_a_slot_copy_waits_for_the_steps_issued_before_its_bytes_were_handed_over_and_no_later_one(
        checkpoints, adapters):
    """The copier thread starts a write after its reservation, when the compute stream holds later
    steps: the copy follows the work issued before the bytes were handed over (what may still read
    them), not those later steps, and lands whole."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, device="cuda")
    pools, manager = engine.runner.slot_pools, engine.lora_manager
    slot = _reserve(manager, "t/a@v1", adapters[FAMILY]["a"])
    adapter, (start, numel) = manager.host["t/a@v1"], manager.slot_spans[slot]
    heap = pools.storage[start:start + numel]
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    heap.fill_(float("nan"))  # a step that may touch the bytes, after ~0.1 s: before the handover
    after = pools.handed_over()
    torch.cuda._sleep(2_000_000_000)  # a later step (~1 s)
    later = torch.cuda.Event()
    later.record()
    copied = pools.write(slot, start, adapter, after)
    copied.synchronize()
    assert not later.query(), "the copy waited for a step issued after the handover"
    assert torch.equal(heap, adapter.packed.to(heap.device)), "the copy did not wait for the step before it"
    torch.cuda._sleep(2_000_000_000)
    slept = torch.cuda.Event()
    slept.record()
    pools.write(slot, start, adapter).synchronize()  # without `after`: the whole stream as it stands
    assert slept.query()


@pytest.mark.parametrize("sharing", [False, True])
def test_a_heap_that_cannot_hold_the_largest_adapter_is_refused_at_start(checkpoints, sharing):
    """An adapter of max_lora_rank on every target that fits in no heap, even with every KV block
    it may borrow, would wait for good: the engine says so when it starts."""
    from engine.errors import EngineError

    probe = make_engine(checkpoints[FAMILY], max_loras=1, max_lora_rank=16, lora_layout="bytes")
    largest = probe.runner.slot_pools.slot_bytes
    with pytest.raises(EngineError, match="raise lora_heap_bytes or lower max_lora_rank"):
        make_engine(checkpoints[FAMILY], max_loras=4, max_lora_rank=16, lora_layout="bytes", max_model_len=64,
                    block_size=16, num_kv_blocks=4, lora_heap_bytes=largest // 2, kv_heap_sharing=sharing)
    engine = make_engine(checkpoints[FAMILY], max_loras=4, max_lora_rank=16, lora_layout="bytes",
                         lora_heap_bytes=largest, kv_heap_sharing=sharing)
    assert engine.lora_manager.heap_bytes >= largest

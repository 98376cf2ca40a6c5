"""LoRAManager: slot copies on a side stream (CUDA path) with a stand-in for the slot pools;
failed loads remembered for failure_ttl_s (an injected clock), then retried."""
import json
import shutil
import threading
from concurrent.futures import wait

import pytest
import torch

from engine.errors import AdapterLoadError
from engine.lora.adapter import LoRAAdapter
from engine.lora.manager import LoRAManager
from tests.engine.helpers import make_engine


OVERTAKE_WINDOW_S = 0.1  # a copier that runs copies side by side starts the second within ~1 ms


class RecordingPools:
    """One slot, a non-None stream (so copies go through the loader threads), writes recorded.
    The first adapter's write holds until the second copy has been reserved, then leaves a
    window in which a copier that does not serialise its copies would write the second one
    first. A serial copier spends the whole window: that nothing overtakes can only be seen by
    giving it the chance."""

    num_slots, stream, dtype, device = 1, object(), torch.float32, torch.device("cpu")

    def __init__(self):
        self.order: list[str] = []
        self.second_reserved = threading.Event()
        self.second_written = threading.Event()
        self.storage = torch.zeros(4)  # the heap: room for one adapter of image_numel elements

    def image_numel(self, adapter: LoRAAdapter) -> int:
        return 4

    def handed_over(self):
        return None  # no device steps to order after

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None):
        if adapter.name == "first":
            assert self.second_reserved.wait(timeout=30), "the second reservation never came"
            self.second_written.wait(timeout=OVERTAKE_WINDOW_S)
        self.order.append(adapter.name)
        if adapter.name == "second":
            self.second_written.set()
        return None  # no CUDA event: the copy counts as done when the write returns

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def test_copies_into_a_reused_slot_land_in_reservation_order():
    """A slot released while its copy is still queued and re-reserved for another adapter must
    end up holding the second adapter: the copies into it may not overtake each other."""
    pools = RecordingPools()
    manager = LoRAManager(pools, spec=None, max_rank=4, host_capacity=2)
    for name in ("first", "second"):
        manager.host[name] = LoRAAdapter(name)  # already in the host tier
    try:
        assert manager.reserve("first", "unused") == 0
        first_copy = manager.slot_events[0]
        manager.release(0)  # its request was aborted before the copy ran
        assert manager.reserve("second", "unused") == 0
        second_copy = manager.slot_events[0]
        pools.second_reserved.set()
        first_copy.result(timeout=10)
        second_copy.result(timeout=10)
        assert pools.order == ["first", "second"]
        assert manager.is_ready(0) and manager.resident() == {"second": 0}
    finally:
        manager.shutdown()


class FailingPools(RecordingPools):
    """Writes of the adapter named "bad" fail, as a CUDA copy error would."""

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None):
        if adapter.name == "bad":
            raise RuntimeError("copy failed")
        return super().write(slot, start, adapter)


def test_failed_copy_fails_every_holder_of_the_slot():
    """Two requests share an adapter whose slot copy fails: both fail (neither runs on the
    half-written slot), and the slot is usable again once both let it go."""
    manager = LoRAManager(FailingPools(), spec=None, max_rank=4, host_capacity=2)
    manager.host["bad"] = LoRAAdapter("bad")
    manager.host["good"] = LoRAAdapter("good")
    try:
        first, second = manager.reserve("bad", "unused"), manager.reserve("bad", "unused")
        assert first == second == 0
        manager.slot_events[0].exception(timeout=10)  # wait for the copy to fail
        for _ in range(2):  # each holder asks in turn
            with pytest.raises(AdapterLoadError, match="copy"):
                manager.is_ready(0)
        manager.release(0)
        manager.release(0)
        assert manager.reserve("good", "unused") == 0
        manager.slot_events[0].result(timeout=10)
        assert manager.is_ready(0)
    finally:
        manager.shutdown()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reserve_when_loaded(manager: LoRAManager, name: str, path: str):
    """reserve() until the host load settles: a slot, or the load's AdapterLoadError."""

    slot = manager.reserve(name, path)
    if slot is None:
        assert name in manager.loading, "a miss must start a host load"
        wait([manager.loading[name]], timeout=30)
        slot = manager.reserve(name, path)
    return slot


def test_failed_load_fails_fast_within_its_ttl_and_is_retried_after(checkpoints, adapters, tmp_path):
    """An adapter that does not fit fails its load; requests within failure_ttl_s fail at once with
    that message (no new load), even after the files are fixed; after the TTL a request retries
    and succeeds. (Files that cannot be read at all: test_a_failure_to_read_files_lasts_only_...)"""
    good = adapters["qwen3_moe"]["a"]
    path = tmp_path / "adapter"
    shutil.copytree(good, path)
    config = json.loads((good / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 1}))
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=1, max_lora_rank=16, lora_failure_ttl_s=5.0)
    assert engine.lora_manager.failure_ttl_s == 5.0  # wired from EngineConfig
    clock = FakeClock()
    manager = LoRAManager(engine.runner.slot_pools, engine.spec, 16, 2, failure_ttl_s=5.0, clock=clock)
    try:
        with pytest.raises(AdapterLoadError) as first:
            _reserve_when_loaded(manager, "t/a", str(path))
        assert manager.stats.failures == 1
        shutil.copy(good / "adapter_config.json", path / "adapter_config.json")  # fixed
        clock.now += 4.9
        with pytest.raises(AdapterLoadError) as again:
            manager.reserve("t/a", str(path))
        assert str(again.value) == str(first.value) and "t/a" not in manager.loading  # no new load
        clock.now += 0.1
        slot = _reserve_when_loaded(manager, "t/a", str(path))
        assert slot == 0 and manager.is_ready(slot) and manager.resident() == {"t/a": 0}
        assert manager.stats.failures == 1 and manager.stats.host_loads == 1
    finally:
        manager.shutdown()
        engine.shutdown()


def test_failure_expires_only_for_its_adapter_and_forget_failure_clears_it_at_once():
    clock = FakeClock()
    manager = LoRAManager(RecordingPools(), spec=None, max_rank=4, host_capacity=2, failure_ttl_s=30.0,
                          clock=clock)
    try:
        for name in ("x", "y"):
            with pytest.raises(AdapterLoadError, match=f"broken {name}"):
                manager._fail(name, f"broken {name}")
        clock.now += 10
        manager.forget_failure("x")
        manager._raise_remembered_failure("x", "unused")
        with pytest.raises(AdapterLoadError, match="broken y"):
            manager._raise_remembered_failure("y", "unused")
        clock.now += 20
        manager._raise_remembered_failure("y", "unused")
        assert manager.failed == {}
    finally:
        manager.shutdown()


def test_a_failure_to_read_files_lasts_only_while_those_files_stay(tmp_path):
    """The replica fetches an adapter again when its files could not be read (a disk cache that
    dropped or damaged them): the new files load at the next request, not after failure_ttl_s."""
    from engine.errors import AdapterFilesError
    manager = LoRAManager(RecordingPools(), spec=None, max_rank=4, host_capacity=2, failure_ttl_s=30.0)
    loaded = []

    def load(name, path):
        if not (tmp_path / "entry" / "adapter_model.safetensors").exists():
            raise AdapterFilesError(f"adapter directory {path} does not exist", path)
        loaded.append(name)
        return LoRAAdapter(name)
    manager._load_to_host = load
    path = str(tmp_path / "entry")
    try:
        assert manager.reserve("x", path) is None
        wait(list(manager.loading.values()), timeout=10)
        manager.collect_loads()
        with pytest.raises(AdapterFilesError, match="does not exist"):
            manager.reserve("x", path)  # remembered: a waiting request does not load it again
        (tmp_path / "entry").mkdir()
        (tmp_path / "entry" / "adapter_model.safetensors").write_bytes(b"fetched again")
        assert manager.reserve("x", path) is None  # a new load, within failure_ttl_s
        wait(list(manager.loading.values()), timeout=10)
        manager.collect_loads()
        assert loaded == ["x"] and "x" in manager.host and manager.failed == {}
    finally:
        manager.shutdown()


def test_a_load_whose_request_went_away_lands_in_the_bounded_host_tier_and_loads_never_outnumber_it():
    """Requests that started host loads and were aborted before them: the finished loads are
    collected into the host tier under its bound, not kept (pinned) in orphaned futures; no more
    loads run at once than the tier holds (more would drop each other on landing)."""
    manager = LoRAManager(RecordingPools(), spec=None, max_rank=4, host_capacity=2)
    manager._load_to_host = lambda name, path: LoRAAdapter(name)
    try:
        for k in range(4):
            assert manager.reserve(f"ad{k}", "unused") is None  # load started (or deferred), then the request left
        assert list(manager.loading) == ["ad0", "ad1"]
        wait(list(manager.loading.values()), timeout=10)
        manager.collect_loads()
        assert manager.loading == {} and list(manager.host) == ["ad0", "ad1"]
        assert manager.reserve("ad2", "unused") is None and manager.loading == {}  # ad0 and ad1 are waited for
        manager.begin_step()
        manager.begin_step()  # a step on, nobody asked for them again
        assert manager.reserve("ad2", "unused") is None and list(manager.loading) == ["ad2"]
    finally:
        manager.shutdown()


def test_collected_failures_fail_fast_and_are_dropped_once_expired():
    now = [0.0]
    manager = LoRAManager(RecordingPools(), spec=None, max_rank=4, host_capacity=2, failure_ttl_s=5.0,
                          clock=lambda: now[0])

    def broken(name, path):
        raise AdapterLoadError(f"{name}: broken file")
    manager._load_to_host = broken
    try:
        assert manager.reserve("x", "unused") is None
        wait(list(manager.loading.values()), timeout=10)
        manager.collect_loads()
        assert manager.loading == {} and "x" in manager.failed
        with pytest.raises(AdapterLoadError, match="broken file"):
            manager.reserve("x", "unused")
        now[0] = 6.0
        manager.collect_loads()
        assert manager.failed == {}
    finally:
        manager.shutdown()


def _packed(name: str, numel: int) -> LoRAAdapter:
    """A host-tier adapter whose compact image is `numel` fp32 elements."""
    return LoRAAdapter(name, packed=torch.zeros(numel), packed_ranks=torch.zeros(1, dtype=torch.int32),
                       packed_offsets=torch.zeros(1, dtype=torch.int64))


def test_host_tier_is_bounded_by_the_bytes_of_each_adapters_own_image():
    """10 MiB of pinned host tier without an arena (pools that pack their own images, as a
    replica over several GPUs does): two 3 MiB images (4 MiB as torch's pinned allocator rounds
    them) fit, a third drops the least recently used; twenty 200 KiB images (256 KiB rounded) all
    fit."""
    manager = LoRAManager(RecordingPools(), spec=None, max_rank=4, host_capacity=64, host_bytes=10 << 20)
    try:
        for name in ("big0", "big1", "big2"):
            manager._admit_to_host(name, _packed(name, (3 << 20) // 4))
        assert list(manager.host) == ["big1", "big2"] and manager.host_bytes_used == 8 << 20
        for i in range(20):
            manager._admit_to_host(f"small{i}", _packed(f"small{i}", (200 << 10) // 4))
        assert [n for n in manager.host if n.startswith("small")] == [f"small{i}" for i in range(20)]
        assert manager.host_bytes_used <= 10 << 20 and len(manager.host) == 21  # big2 and the twenty
    finally:
        manager.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_adapter_files_read_as_safetensors_reads_them_and_keep_nothing_per_load(tiny_adapter, tmp_path, dtype):
    """The loader reads the file into one buffer, each tensor a view of it; safetensors'
    safe_open(framework="pt") kept ~56 bytes per tensor per load for good."""
    import gc
    import tracemalloc

    from safetensors.torch import load_file, save_file

    from engine.lora.adapter import _read_tensors
    src = tiny_adapter("qwen3_moe", "per_expert", rank=4) / "adapter_model.safetensors"
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: t.to(getattr(torch, dtype)) for k, t in load_file(str(src)).items()}, str(path))
    want = load_file(str(path))
    got = _read_tensors(path)
    assert list(got) == sorted(want, key=list(got).index) and set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    for _ in range(5):
        _read_tensors(path)
    tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(100):
        _read_tensors(path)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept / 100 < 8 * len(want), kept  # safe_open kept ~56 a tensor


def test_an_adapter_file_cut_short_is_a_files_error_naming_it(tiny_adapter, tmp_path):
    from engine.errors import AdapterFilesError
    from engine.lora.adapter import _read_dir
    src = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterFilesError, match="adapter_model.safetensors"):
        _read_dir(cut)


def test_a_name_held_from_other_files_is_a_load_error_not_the_old_weights(tiny_checkpoint, tiny_adapter):
    """A name stands for one adapter version: asked for with other files while its copy from the
    first is held, the engine says so (it served the old weights and their cached prefixes)."""
    from engine.sequence import LoRARequest
    from engine.sampling_params import SamplingParams

    engine = make_engine(tiny_checkpoint("qwen3_moe"), max_loras=2, max_lora_rank=8)
    first, second = (tiny_adapter("qwen3_moe", "per_expert", rank=8, seed=s) for s in (1, 2))
    params = SamplingParams(max_tokens=2, temperature=0)
    assert engine.generate([[5, 6, 7]], params, [LoRARequest("t/ad@v1", str(first))])[0]["error"] is None
    [out] = engine.generate([[5, 6, 7]], params, [LoRARequest("t/ad@v1", str(second))])
    assert out["error"] is not None and "name of its own" in str(out["error"])
    assert engine.generate([[5, 6, 7]], params, [LoRARequest("t/ad@v2", str(second))])[0]["error"] is None

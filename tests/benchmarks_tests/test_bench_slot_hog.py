"""benchmarks/bench_slot_hog.py --tiny end to end (CPU): the hog takes every slot; the victim's
first request gets one through the slot-fair preemption, and its adapter then stays resident
between its requests (engine.slot_policy keeps a small tenant's adapter from the flood)."""
import json

from benchmarks import bench_slot_hog


def test_tiny_run_drains_one_hog_slot_then_keeps_the_victims_adapter_resident(tmp_path):
    out = tmp_path / "hog.json"
    assert bench_slot_hog.main(["--tiny", "--victims", "4", "--hog-tokens", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    alone, hog = result["alone"], result["hog"]
    assert len(alone["victim_steps"]) == len(hog["victim_steps"]) == 4
    assert alone["counters"]["lora_slot_preemptions"] == 0
    # one prefill step, then a token a step (8 tokens); the first may also wait for its slot's copy
    assert alone["victim_steps"][1:] == [8, 8, 8] and 8 <= alone["victim_steps"][0] <= 12
    # the first: slot_reclaim_steps (8) of waiting, a drained hog slot and the load, far below a
    # hog request's 120 steps; the rest find their adapter resident
    assert hog["counters"]["lora_slot_preemptions"] == 1
    assert 8 < hog["victim_steps"][0] <= 8 + 8 + 4
    assert all(steps <= 9 for steps in hog["victim_steps"][1:]), hog["victim_steps"]


def test_from_disk_the_hogs_adapters_load_into_the_host_tier_during_its_run(tmp_path):
    """--from-disk: the victim's adapter is loaded before the runs, so the unloaded run loads
    nothing; each hog adapter the hog's run names is a host load in that run (none pinned on CPU)."""
    out = tmp_path / "hog.json"
    assert bench_slot_hog.main(["--tiny", "--from-disk", "--victims", "3", "--hog-tokens", "40",
                                "--hog-adapters", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    alone, hog = result["alone"]["counters"], result["hog"]["counters"]
    assert alone["lora_host_loads"] == 0 and hog["lora_host_loads"] == 3
    assert hog["lora_host_pin_seconds"] == 0 and hog["lora_host_unpinned_images"] == 0
    assert len(result["hog"]["slowest_steps"]) == 8 and result["host_tier"]["lora_host_pinned_bytes"] == 0

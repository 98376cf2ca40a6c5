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

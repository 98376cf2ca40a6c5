"""benchmarks/bench_slot_hog.py --tiny end to end (CPU): the hog takes every slot, and each victim
request gets one through the slot-fair preemption instead of waiting for a long request to end."""
import json

from benchmarks import bench_slot_hog


def test_tiny_run_drains_a_hog_slot_for_each_victim_request(tmp_path):
    out = tmp_path / "hog.json"
    assert bench_slot_hog.main(["--tiny", "--victims", "4", "--hog-tokens", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    alone, hog = result["alone"], result["hog"]
    assert len(alone["victim_steps"]) == len(hog["victim_steps"]) == 4
    assert alone["counters"]["lora_slot_preemptions"] == 0
    # one prefill step, then a token a step (8 tokens); the first may also wait for its slot's copy
    assert alone["victim_steps"][1:] == [8, 8, 8] and 8 <= alone["victim_steps"][0] <= 12
    assert hog["counters"]["lora_slot_preemptions"] == 4  # one slot drained per victim request
    # waits bounded by slot_reclaim_steps (8) plus the load, far below a hog request's 120 steps
    assert all(8 < steps <= 8 + 8 + 4 for steps in hog["victim_steps"])

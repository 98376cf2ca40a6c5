"""Where a request's time went before its first token, as the engine reports it (RequestOutput.timings)."""
import pytest

from engine import SamplingParams
from tests.engine.helpers import PROMPTS, lora, make_engine, run_to_end, wait_for_adapters

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_first_token_and_final_outputs_carry_the_phases_and_the_others_none(checkpoints):
    engine = make_engine(checkpoints["qwen3_moe"])
    engine.add_request("r", PROMPTS[0], GREEDY)
    outs = run_to_end(engine)["r"]
    assert len(outs) == 4
    first, middle, final = outs[0], outs[1:-1], outs[-1]
    phases = {k: v for k, v in first.timings.items() if not k.endswith("_at")}
    assert set(phases) == {"handoff", "queue", "prefill"}  # a base-model request: no adapter
    assert all(v >= 0 for v in phases.values())
    # the two ends: the phases fill the time between them
    ends = first.timings["first_token_at"] - first.timings["arrived_at"]
    assert sum(phases.values()) == pytest.approx(ends, abs=1e-9)
    assert all(out.timings is None for out in middle)
    assert final.finished and final.timings == first.timings


def test_a_request_behind_a_full_batch_queues_for_at_least_the_others_prefill(checkpoints):
    """max_num_seqs=1: the second request is launched only after the first finished, so its queue
    holds the whole of the first's run, prefill included."""
    engine = make_engine(checkpoints["qwen3_moe"], max_num_seqs=1)
    engine.add_request("first", PROMPTS[0], GREEDY)
    engine.add_request("second", PROMPTS[1], GREEDY)
    outs = run_to_end(engine)
    first, second = outs["first"][0].timings, outs["second"][0].timings
    assert second["queue"] > first["prefill"] + first["queue"]


def test_an_adapter_request_reports_when_its_adapter_was_ready(checkpoints, adapters):
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=2, max_lora_rank=16)
    engine.add_request("r", PROMPTS[0], GREEDY, lora=lora(adapters, "qwen3_moe", "a"))
    timings = run_to_end(engine)["r"][0].timings
    assert set(timings) == {"handoff", "queue", "adapter", "prefill", "arrived_at", "first_token_at"}
    # the scheduler launches a request only once its adapter is in a ready slot
    assert timings["adapter"] <= timings["handoff"] + timings["queue"]


def test_a_request_aged_waiting_for_its_adapter_is_logged_once_with_what_holds_the_slots(checkpoints, adapters,
                                                                                          caplog):
    """One slot, held by tenant-a's long request: tenant-b's request ages (3 steps) and the log
    says once which adapter holds the slot and that b's adapter waits for one."""
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=1, max_lora_rank=16, max_adapter_wait_steps=3,
                         slot_reclaim_steps=None, max_model_len=64)
    long = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    wait_for_adapters(engine, [lora(adapters, "qwen3_moe", "a")])  # hold's own load does not age it
    engine.add_request("hold", PROMPTS[0], long, lora=lora(adapters, "qwen3_moe", "a"))
    while not engine.scheduler.running:
        engine.step()
    engine.add_request("wait", PROMPTS[1], GREEDY, lora=lora(adapters, "qwen3_moe", "b"))
    outs = run_to_end(engine)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request wait has waited")]
    assert len(lines) == 1
    assert "tenant-b/ad@v1" in lines[0] and "0: tenant-a/ad@v1 (refs 1, running 1)" in lines[0]
    first = outs["wait"][0].timings  # it waited for the rest of hold's run, steps longer than its own prefill
    assert outs["wait"][-1].finished and first["adapter"] > first["prefill"]

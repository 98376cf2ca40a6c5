"""benchmarks/sim_workload.py: the trace through the real scheduler and adapter cache on a cost model."""
import json

from benchmarks import sim_workload


def _run(tmp_path, *extra) -> dict:
    out = tmp_path / "sim.json"
    assert sim_workload.main(["--requests", "60", "--adapters", "16", "--rate", "4", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_a_heap_holding_every_adapter_loads_each_once_and_never_compacts(tmp_path):
    sizes = [sim_workload.image_bytes(*sim_workload.adapter_class(k)) for k in range(16)]
    results = _run(tmp_path, "--heap-gb", str(sum(sizes) / 1e9 + 1))
    lora = results["adapters"]
    trace = sim_workload.make_trace(sim_workload.argparse.Namespace(
        adapters=16, requests=60, zipf=1.0, prompt_range=[128, 2048], output_range=[32, 512], seed=0))
    assert lora["slot_loads"] == len({req["adapter"] for req in trace}) and lora["compactions"] == 0
    assert lora["evictions"] == 0 and results["no_adapters"]["slot_loads"] == 0
    assert 0 <= lora["adapter_wait_s_max"] <= lora["ttft_s_max"] and "adapter_wait_s_max" not in results["no_adapters"]


def test_a_heap_barely_larger_than_one_rank_64_adapter_compacts_and_finishes_every_request(tmp_path):
    """7 GB: a 6.75 GB rank-64 image needs nearly all of it, so a smaller one held where it
    would go must slide away rather than wait; every request of the trace still finishes."""
    on = _run(tmp_path, "--heap-gb", "7", "--no-sharing")
    off = _run(tmp_path, "--heap-gb", "7", "--no-sharing", "--no-compaction")
    assert on["adapters"]["compactions"] > 0 and off["adapters"]["compactions"] == 0
    assert on["adapters"]["finished"] == off["adapters"]["finished"] == on["no_adapters"]["finished"] == 60


def test_a_heap_that_borrows_idle_kv_blocks_evicts_fewer_adapters_and_finishes_every_request(tmp_path):
    shared = _run(tmp_path, "--heap-gb", "7")
    alone = _run(tmp_path, "--heap-gb", "7", "--no-sharing")
    assert shared["adapters"]["kv_blocks_borrowed"] > 0 and alone["adapters"]["kv_blocks_borrowed"] == 0
    assert shared["adapters"]["evictions"] < alone["adapters"]["evictions"]
    assert shared["adapters"]["finished"] == alone["adapters"]["finished"] == 60


def test_a_prompt_token_costing_more_with_adapters_slows_only_the_adapter_run(tmp_path):
    plain = _run(tmp_path, "--heap-gb", "60")
    costly = _run(tmp_path, "--heap-gb", "60", "--prefill-lora-factor", "3")
    assert costly["no_adapters"]["seconds"] == plain["no_adapters"]["seconds"]
    assert costly["adapters"]["seconds"] > plain["adapters"]["seconds"]


def test_case_d_runs_under_40_of_its_64_adapters_a_step_and_longer_on_slower_copies(tmp_path):
    """65.6 GB of heap (and the idle KV blocks it borrows) holds about 40 images of 1.69 GB: 64
    requests on 64 adapters run in two waves, every adapter loaded (some twice, as the heap gives
    borrowed blocks back), and the second wave waits on the copies."""
    def case_d(gbps: str) -> dict:
        out = tmp_path / f"d{gbps}.json"
        assert sim_workload.main(["--case-d", "--pcie-gbps", gbps, "--out", str(out)]) == 0
        return json.loads(out.read_text())
    fast, slow = case_d("55"), case_d("30")
    lora = fast["adapters"]
    assert lora["finished"] == fast["no_adapters"]["finished"] == 64
    assert 64 <= lora["slot_loads"] <= 70 and lora["evictions"] >= 24 and lora["kv_blocks_borrowed"] > 0
    assert lora["tokens_per_step"] < 40 < fast["no_adapters"]["tokens_per_step"]
    assert slow["adapters"]["seconds"] > lora["seconds"] and slow["no_adapters"] == fast["no_adapters"]


def test_case_d_as_the_h100_ran_it_holds_fewer_adapters_a_step_on_smaller_images(tmp_path):
    """The H100 run's 24.35 GB heap at 35 layers (1.23 GB images) holds about 20 adapters: fewer
    sequences a step than the H200's 65.6 GB, and every adapter still loads."""
    runs = {}
    for card in ("h100", "h200"):
        out = tmp_path / f"{card}.json"
        assert sim_workload.main(["--case-d", card, "--pcie-gbps", "46", "--out", str(out)]) == 0
        runs[card] = json.loads(out.read_text())
    h100, h200 = runs["h100"]["adapters"], runs["h200"]["adapters"]
    assert h100["finished"] == 64 and h100["slot_loads"] >= 64
    assert h100["tokens_per_step"] < 22 < h200["tokens_per_step"]
    assert runs["h100"]["args"]["heap_gb"] == 24.35 and runs["h200"]["args"]["heap_gb"] == 65.61


def test_a_fitted_step_cost_grows_with_the_batch_and_the_timeline_samples_the_queue(tmp_path):
    """--fit prices a step by its sequences and prompt tokens: a larger per-sequence price slows
    the run; each run logs running and waiting sequences and lent KV blocks once a modelled second."""
    cheap = _run(tmp_path, "--heap-gb", "60", "--fit", "9", "0.1", "0.02")
    dear = _run(tmp_path, "--heap-gb", "60", "--fit", "9", "1.0", "0.02")
    assert dear["no_adapters"]["seconds"] > cheap["no_adapters"]["seconds"]
    rows = cheap["adapters"]["timeline"]["rows"]
    assert cheap["adapters"]["timeline"]["columns"] == ["s", "running", "waiting", "kv_blocks_lent", "kv_blocks_free"]
    assert len(rows) >= int(cheap["adapters"]["seconds"]) - 1 and max(r[1] for r in rows) > 0
    assert all(a[0] < b[0] for a, b in zip(rows, rows[1:]))


def test_lora_bytes_floor_reads_attention_once_and_the_experts_its_tokens_reach():
    """An adapter's attention factors count once a step; its experts' by the share of the 128
    experts its tokens reach at top-8: 1/16 for one decode token, all of them for a long prompt;
    two sequences of one adapter read its factors once."""
    from engine.sequence import LoRARequest

    class Seq:
        def __init__(self, k: int):
            self.lora = LoRARequest(f"w{k}", "/in-host-tier")

    classes = {sim_workload.adapter_class(k): k for k in range(16)}
    both, experts_only, attention_only = classes[(16, "both")], classes[(16, "experts")], classes[(16, "attention")]
    attention, experts = sim_workload.factor_bytes(16, "both", 16, None)
    assert attention > 0 and experts > 10 * attention
    assert sim_workload.lora_step_bytes([(Seq(attention_only), 1)], 16) == attention
    assert sim_workload.lora_step_bytes([(Seq(attention_only), 2048)], 16) == attention
    assert sim_workload.lora_step_bytes([(Seq(experts_only), 1)], 16) == int(experts / 16)
    assert abs(sim_workload.lora_step_bytes([(Seq(experts_only), 2048)], 16) - experts) <= 1
    two = sim_workload.lora_step_bytes([(Seq(both), 1), (Seq(both), 1)], 16)
    assert two == int(attention + experts * (1 - (120 / 128) ** 2)) < 2 * (attention + experts / 16)


def test_steps_priced_at_the_lora_bytes_floor_cost_more_than_the_plain_fit_and_less_at_a_higher_rate(tmp_path):
    fit = ["--heap-gb", "60", "--fit", "9", "0.25", "0.02"]
    plain = _run(tmp_path, *fit)
    slow = _run(tmp_path, *fit, "--lora-floor-gbps", "500")
    fast = _run(tmp_path, *fit, "--lora-floor-gbps", "4000")
    assert slow["no_adapters"]["seconds"] == fast["no_adapters"]["seconds"] == plain["no_adapters"]["seconds"]
    assert slow["adapters"]["lora_floor_ms_a_step"] > fast["adapters"]["lora_floor_ms_a_step"] > 0
    assert "lora_floor_ms_a_step" not in plain["adapters"] and "lora_floor_ms_a_step" not in slow["no_adapters"]
    assert slow["adapters"]["seconds"] > fast["adapters"]["seconds"] > plain["adapters"]["seconds"]


def test_lora_floor_needs_the_plain_fit_and_replaces_the_lora_fit():
    import pytest
    for argv in (["--lora-floor-gbps", "4000"], ["--fit", "9", "0.25", "0.02", "--lora-fit", "9", "0.25", "0.02",
                                                  "--lora-floor-gbps", "4000"]):
        with pytest.raises(SystemExit):
            sim_workload.main(argv)

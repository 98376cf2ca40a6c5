"""benchmarks/workload_steps.py: a trace's steps fitted and the adapter run's time split."""
import json

import pytest

from benchmarks import workload_steps


def _run(a: float, b: float, c: float, batches: list[tuple[int, int]], wall: float) -> dict:
    """A run whose every step costs a + b * sequences + c * (tokens - sequences) ms exactly."""
    log = [[a + b * n + c * (k - n), n, n // 2, k] for n, k in batches] + [[0.5, 0, 0, 0]]  # an empty step
    return {"seconds": wall, "step_log": log}


BATCHES = [(n, n + extra) for n in (4, 20, 40, 60) for extra in (0, 0, 0, 128, 512)]


def test_the_fit_recovers_a_steps_prices_and_decode_steps_are_told_from_prompt_steps():
    s = workload_steps.summary(_run(8.0, 0.25, 0.02, BATCHES, wall=10.0))
    assert s["fit_ms"] == pytest.approx({"a": 8.0, "per_sequence": 0.25, "per_extra_token": 0.02})
    assert s["fit_r_squared"] == pytest.approx(1.0)
    assert s["steps"] == len(BATCHES)  # the empty step is no step
    assert s["decode_only"]["steps"] == 12 and s["with_prompt"]["steps"] == 8
    assert s["decode_ms_p50_by_batch"]["16-31"] == {"steps": 3, "ms_p50": pytest.approx(8.0 + 0.25 * 20)}
    assert "65+" not in s["decode_ms_p50_by_batch"]


def test_the_adapter_runs_extra_time_splits_into_step_cost_batching_and_time_outside_steps():
    none = _run(8.0, 0.25, 0.02, BATCHES, wall=10.0)
    # the same tokens in twice the steps of half the sequences, each step 1.5x the no-adapter price
    halves = [(n // 2, n // 2 + (k - n) // 2) for n, k in BATCHES] * 2
    adapters = _run(8.0, 0.25, 0.02, halves, wall=20.0)
    adapters["step_log"] = [[1.5 * ms, n, a, k] for ms, n, a, k in adapters["step_log"]]
    sp = workload_steps.split(none, adapters)
    priced = workload_steps.price(workload_steps._steps(adapters), (8.0, 0.25, 0.02))
    assert sp["priced_without_lora_s"] == pytest.approx(priced)
    assert sp["step_cost_over_price_s"] == pytest.approx(0.5 * priced)  # the 1.5x
    # twice the steps for the same tokens: the fixed 8 ms once more a step (the empty step is 0.5 ms)
    assert sp["batching_s"] == pytest.approx(8.0 * len(BATCHES) / 1e3)
    assert sp["outside_steps_s"] == pytest.approx(20.0 - 1.5 * priced)


def test_the_command_prints_both_runs_and_the_split_and_writes_the_numbers(tmp_path, capsys):
    data = {"no_adapters": _run(8.0, 0.25, 0.02, BATCHES, 10.0), "adapters": _run(12.0, 0.3, 0.03, BATCHES, 12.0)}
    (tmp_path / "run.json").write_text(json.dumps(data))
    assert workload_steps.main([str(tmp_path / "run.json"), "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    assert "== no_adapters: 20 steps" in printed and "== adapters: 20 steps" in printed
    assert "fit: 12.00 ms + 0.300 ms a sequence + 0.0300 ms a token past one a sequence" in printed
    assert json.loads((tmp_path / "out.json").read_text())["split"]["step_cost_over_price_s"] > 0


def test_a_run_without_a_step_log_is_left_out_with_the_split_and_a_file_with_none_is_refused():
    text, out = workload_steps.report({"no_adapters": {"seconds": 9.0, "from_file": "old.json"},
                                       "adapters": _run(12.0, 0.3, 0.03, BATCHES, 12.0)})
    assert text.splitlines()[0] == "== no_adapters: no step_log, left out"
    assert set(out) == {"adapters"} and "== adapters: 20 steps" in text
    with pytest.raises(SystemExit, match="no run in this file has a step_log"):
        workload_steps.report({"adapters": {"seconds": 1.0}})


def test_steps_of_one_batch_shape_are_refused_rather_than_fitted():
    with pytest.raises(SystemExit, match="too few batch shapes"):
        workload_steps.fit(workload_steps._steps(_run(8.0, 0.25, 0.02, [(8, 8)] * 5, wall=1.0)))

"""benchmarks/bench_workload.py: the trace's mix and arrivals, and a --tiny run end to end (CPU)."""
import argparse
import json
import statistics
from collections import Counter

import pytest

from benchmarks import bench_workload


def _args(**kw) -> argparse.Namespace:
    base = dict(adapters=256, requests=4000, zipf=1.0, prompt_range=[128, 2048], output_range=[32, 512], seed=3)
    return argparse.Namespace(**{**base, **kw})


def test_adapter_mix_is_a_quarter_attention_a_quarter_experts_half_both_over_four_ranks():
    classes = [bench_workload.adapter_class(k) for k in range(256)]
    kinds = Counter(kind for _, kind in classes)
    assert kinds == {"attention": 64, "experts": 64, "both": 128}
    assert Counter(rank for rank, _ in classes) == {8: 64, 16: 64, 32: 64, 64: 64}
    assert len(set(classes)) == 12  # every rank with every targets choice


def test_trace_is_zipf_over_adapters_with_lengths_in_range_and_fixed_by_the_seed():
    trace = bench_workload.make_trace(_args())
    counts = Counter(req["adapter"] for req in trace).most_common()
    harmonic = sum(1 / k for k in range(1, 257))
    assert abs(counts[0][1] / len(trace) - 1 / harmonic) < 0.03  # the top adapter: ~16% at s = 1
    assert counts[0][1] > 1.6 * counts[1][1]  # the second: about half as often
    assert all(128 <= r["prompt"] <= 2048 and 32 <= r["output"] <= 512 for r in trace)
    assert trace == bench_workload.make_trace(_args())
    assert trace != bench_workload.make_trace(_args(seed=4))


def test_arrivals_are_poisson_at_the_rate():
    timed = bench_workload.timed(bench_workload.make_trace(_args()), rate=20.0, seed=3)
    gaps = [b["t"] - a["t"] for a, b in zip(timed, timed[1:])]
    assert abs(statistics.mean(gaps) - 0.05) < 0.005
    assert abs(statistics.stdev(gaps) - 0.05) < 0.01  # exponential: stdev = mean


def test_tiny_run_finishes_every_request_in_both_runs_and_reports_adapter_traffic(tmp_path):
    out = tmp_path / "workload.json"
    assert bench_workload.main(["--tiny", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    base, lora = results["no_adapters"], results["adapters"]
    assert base["finished"] == lora["finished"] == results["args"]["requests"] == 120
    assert base["goodput_tok_per_s"] > 0 and lora["goodput_tok_per_s"] > 0
    assert results["lora_slots"] == 4 and lora["bytes_moved"] > 0  # 32 adapters through 4 slots
    assert 0 <= lora["resident_hit_rate"] <= 1 and "bytes_moved" not in base
    # each request's wait for its adapter: within its time to first token
    assert 0 <= lora["adapter_wait_s_p99"] <= lora["adapter_wait_s_max"] <= lora["ttft_ms_max"] / 1e3
    assert results["provenance"]["argv"][:2] == ["--tiny", "--out"]
    for run in (base, lora):  # every step timed, its batch counted
        assert run["steps"] > 0 and 0 < run["step_ms_p50"] <= run["step_ms_p99"]
        assert 1 <= run["seqs_per_step"] <= 64
    assert base["adapters_per_step"] == 0 < lora["adapters_per_step"] <= 4


def test_a_long_run_prints_progress_while_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_workload, "PROGRESS_S", 0.0)
    assert bench_workload.main(["--tiny", "--requests", "20", "--out", str(tmp_path / "w.json")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) > 2 and all("finished" in line and "KV blocks lent" in line for line in lines)


def test_split_runs_take_the_baselines_rate_and_compare_against_its_no_adapter_run(tmp_path):
    base_out, lora_out = tmp_path / "base.json", tmp_path / "lora.json"
    assert bench_workload.main(["--tiny", "--requests", "40", "--runs", "none", "--out", str(base_out)]) == 0
    base = json.loads(base_out.read_text())
    assert "adapters" not in base and base["no_adapters"]["finished"] == 40
    assert bench_workload.main(["--tiny", "--requests", "40", "--runs", "adapters", "--baseline", str(base_out),
                                "--out", str(lora_out)]) == 0
    lora = json.loads(lora_out.read_text())
    assert lora["arrival_rate_per_s"] == base["arrival_rate_per_s"]
    assert lora["no_adapters"]["goodput_tok_per_s"] == base["no_adapters"]["goodput_tok_per_s"]
    assert lora["adapters"]["finished"] == 40
    assert lora["goodput_ratio"] == lora["adapters"]["goodput_tok_per_s"] / base["no_adapters"]["goodput_tok_per_s"]


def test_a_baseline_of_another_trace_is_refused(tmp_path):
    base_out = tmp_path / "base.json"
    assert bench_workload.main(["--tiny", "--requests", "20", "--runs", "none", "--out", str(base_out)]) == 0
    with pytest.raises(SystemExit, match="seed"):
        bench_workload.main(["--tiny", "--requests", "20", "--seed", "5", "--runs", "adapters",
                             "--baseline", str(base_out), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="kv_tokens"):  # another KV size is another engine
        bench_workload.main(["--tiny", "--requests", "20", "--kv-tokens", "512", "--runs", "adapters",
                             "--baseline", str(base_out), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="needs --baseline"):
        bench_workload.main(["--tiny", "--runs", "adapters", "--out", str(tmp_path / "x.json")])


def test_kv_tokens_sizes_the_kv_cache_in_whole_blocks(tmp_path):
    out = tmp_path / "w.json"
    assert bench_workload.main(["--tiny", "--requests", "10", "--runs", "none", "--kv-tokens", "500",
                                "--out", str(out)]) == 0
    assert json.loads(out.read_text())["kv_tokens"] == 512


def test_profiled_window_counts_its_steps_and_the_device_time_they_ran(tmp_path):
    out = tmp_path / "workload.json"
    assert bench_workload.main(["--tiny", "--runs", "none", "--profile-steps", "4", "--profile-at", "0",
                                "--out", str(out)]) == 0
    run = json.loads(out.read_text())["no_adapters"]
    window = run["profile"]
    assert window["steps"] == 4 and window["seqs"] == sum(step[1] for step in run["step_log"][:4])
    assert window["tokens"] == sum(step[3] for step in run["step_log"][:4])
    assert window["wall_ms"] == pytest.approx(sum(step[0] for step in run["step_log"][:4]), rel=1e-3)
    # the union of the ops' intervals: no more than their sum, something ran
    assert 0 < window["device_busy_ms"] <= window["kernel_ms"] + 1e-6
    assert any(name.startswith("aten::") for name, _, _ in window["top_kernels"])
    assert len(run["step_log"]) == run["steps"] and all(len(step) == 4 for step in run["step_log"])


def test_each_run_reports_only_the_triton_compiles_made_inside_it(tmp_path, monkeypatch):
    from benchmarks.bench_engine import COMPILES
    base = tmp_path / "base.json"
    assert bench_workload.main(["--tiny", "--requests", "10", "--runs", "none", "--out", str(base)]) == 0
    step = bench_workload.LLMEngine.step

    def step_that_compiles(engine):  # every step "compiles" one kernel
        COMPILES._hook(repr="_lora_rows_kernel[grid]")
        return step(engine)

    monkeypatch.setattr(bench_workload.LLMEngine, "step", step_that_compiles)
    COMPILES.names.append("at_start_up")  # with a baseline, nothing runs between start-up and the run
    out = tmp_path / "w.json"
    assert bench_workload.main(["--tiny", "--requests", "10", "--runs", "adapters", "--baseline", str(base),
                                "--out", str(out)]) == 0
    run = json.loads(out.read_text())["adapters"]
    assert run["triton_compiles"] == ["_lora_rows_kernel"] * run["steps"]

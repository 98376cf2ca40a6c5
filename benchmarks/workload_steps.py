"""Where a multi-tenant trace's time went, step by step, from bench_workload.py's JSON.

    python benchmarks/workload_steps.py RUN.json [--json OUT]

bench_workload logs every engine step of a run as [ms, sequences, adapters, tokens]. For each run
in the JSON (no adapters, adapters) this prints:
- the steps that only decode (one token a sequence) and those that also take prompt tokens:
  their count, seconds and mean;
- decode-only steps' median by batch (BATCHES);
- a least-squares fit of a step's ms as a + b * sequences + c * (tokens - sequences), the last
  term being the tokens past one a sequence: prompt tokens, near enough.
With both runs, the adapter run's steps priced at the no-adapter run's fit: the seconds the same
batches would have taken without LoRA. The adapter run's wall time then splits into
  - what its steps cost over that price (LoRA kernels, adapter copies and heap moves on the
    device, more host work a step),
  - the price itself against the no-adapter run's own steps (the same tokens in other batches:
    each step pays the fixed cost `a`; a linear fit of a cost that is not quite linear, so read
    it with the fit's R^2),
  - time outside engine.step() (waiting for arrivals, adding them, the progress lines).
A trace whose arrivals outrun the adapter run keeps a queue (TTFT and adapter waits grow over
the run); the split says which of the three made it fall behind. A run without a step_log (one
from before b20600e, or a baseline copied from such a file) is left out, and so is the split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BATCHES = ((1, 15), (16, 31), (32, 47), (48, 64), (65, 1 << 30))


def _steps(run: dict) -> np.ndarray:
    """[steps, 4]: ms, sequences, adapters, tokens."""
    log = run.get("step_log")
    if not log:
        raise SystemExit("this run has no step_log (bench_workload.py logs one from b20600e on)")
    return np.asarray(log, dtype=np.float64)


def _design(live: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(live)), live[:, 1], live[:, 3] - live[:, 1]])


def fit(steps: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of ms ~ a + b * sequences + c * (tokens - sequences), least squares over the
    steps that ran anything."""
    live = steps[steps[:, 1] > 0]
    coef, _, rank, _ = np.linalg.lstsq(_design(live), live[:, 0], rcond=None)
    if rank < 3:
        raise SystemExit(f"{len(live)} steps of too few batch shapes to fit a step's cost (rank {rank} of 3)")
    return tuple(float(v) for v in coef)


def r_squared(steps: np.ndarray, coef: tuple[float, float, float]) -> float:
    """How much of the steps' variance the fit explains."""
    live = steps[steps[:, 1] > 0]
    residual = live[:, 0] - _design(live) @ np.asarray(coef)
    spread = np.sum((live[:, 0] - live[:, 0].mean()) ** 2)
    return float(1.0 - np.sum(residual ** 2) / spread) if spread > 0 else 1.0


def price(steps: np.ndarray, coef: tuple[float, float, float]) -> float:
    """Seconds the steps would take at a fit's prices."""
    live = steps[steps[:, 1] > 0]
    a, b, c = coef
    return float(np.sum(a + b * live[:, 1] + c * (live[:, 3] - live[:, 1]))) / 1e3


def summary(run: dict) -> dict:
    steps = _steps(run)
    live = steps[steps[:, 1] > 0]
    decode = live[live[:, 3] == live[:, 1]]
    prompt = live[live[:, 3] > live[:, 1]]
    by_batch = {}
    for low, high in BATCHES:
        inside = decode[(decode[:, 1] >= low) & (decode[:, 1] <= high)]
        if len(inside):
            by_batch[f"{low}-{high}" if high < 1 << 30 else f"{low}+"] = {
                "steps": int(len(inside)), "ms_p50": float(np.median(inside[:, 0]))}
    coef = fit(steps)
    return {"wall_s": run["seconds"], "steps": int(len(live)), "step_s": float(live[:, 0].sum()) / 1e3,
            "decode_only": {"steps": int(len(decode)), "s": float(decode[:, 0].sum()) / 1e3,
                            "ms_mean": float(decode[:, 0].mean()) if len(decode) else None},
            "with_prompt": {"steps": int(len(prompt)), "s": float(prompt[:, 0].sum()) / 1e3,
                            "ms_mean": float(prompt[:, 0].mean()) if len(prompt) else None,
                            "tokens_mean": float(prompt[:, 3].mean()) if len(prompt) else None},
            "seqs_per_step": float(live[:, 1].mean()), "adapters_per_step": float(live[:, 2].mean()),
            "decode_ms_p50_by_batch": by_batch,
            "fit_ms": {"a": coef[0], "per_sequence": coef[1], "per_extra_token": coef[2]},
            "fit_r_squared": r_squared(steps, coef)}


def split(none: dict, adapters: dict) -> dict:
    """The adapter run's wall time: its steps over their no-adapter price, that price over the
    no-adapter run's own steps, and the time with no step running (module docstring)."""
    base, lora = _steps(none), _steps(adapters)
    priced = price(lora, fit(base))
    own = float(lora[lora[:, 1] > 0][:, 0].sum()) / 1e3
    base_steps = float(base[base[:, 1] > 0][:, 0].sum()) / 1e3
    return {"adapter_wall_s": adapters["seconds"], "no_adapter_wall_s": none["seconds"],
            "adapter_steps_s": own, "priced_without_lora_s": priced, "no_adapter_steps_s": base_steps,
            "step_cost_over_price_s": own - priced, "batching_s": priced - base_steps,
            "outside_steps_s": adapters["seconds"] - own, "no_adapter_outside_steps_s": none["seconds"] - base_steps}


def report(data: dict) -> tuple[str, dict]:
    runs = {name: data[name] for name in ("no_adapters", "adapters") if name in data}
    lines = [f"== {name}: no step_log, left out" for name, run in runs.items() if not run.get("step_log")]
    runs = {name: run for name, run in runs.items() if run.get("step_log")}
    if not runs:
        raise SystemExit("no run in this file has a step_log (bench_workload.py logs one from b20600e on)")
    out = {name: summary(run) for name, run in runs.items()}
    for name, s in out.items():
        f = s["fit_ms"]
        lines.append(f"== {name}: {s['steps']} steps, {s['step_s']:.1f} s of {s['wall_s']:.1f} s wall; "
                     f"{s['seqs_per_step']:.1f} sequences and {s['adapters_per_step']:.1f} adapters a step")
        d, p = s["decode_only"], s["with_prompt"]
        if d["steps"]:
            lines.append(f"  decode only: {d['steps']} steps, {d['s']:.1f} s, {d['ms_mean']:.2f} ms mean")
        if p["steps"]:
            lines.append(f"  with prompt tokens: {p['steps']} steps, {p['s']:.1f} s, {p['ms_mean']:.2f} ms mean, "
                         f"{p['tokens_mean']:.0f} tokens mean")
        lines.append("  decode-only ms p50 by batch: " + ", ".join(
            f"{k}: {v['ms_p50']:.2f} ({v['steps']})" for k, v in s["decode_ms_p50_by_batch"].items()))
        lines.append(f"  fit: {f['a']:.2f} ms + {f['per_sequence']:.3f} ms a sequence + "
                     f"{f['per_extra_token']:.4f} ms a token past one a sequence (R^2 {s['fit_r_squared']:.2f})")
    if len(runs) == 2:
        sp = out["split"] = split(runs["no_adapters"], runs["adapters"])
        lines.append(f"== adapter run's {sp['adapter_wall_s']:.1f} s against {sp['no_adapter_wall_s']:.1f} s: steps "
                     f"{sp['adapter_steps_s']:.1f} s, of which {sp['step_cost_over_price_s']:.1f} s over their "
                     f"no-adapter price ({sp['priced_without_lora_s']:.1f} s); that price "
                     f"{sp['batching_s']:+.1f} s against the no-adapter run's own steps "
                     f"({sp['no_adapter_steps_s']:.1f} s); outside engine.step() {sp['outside_steps_s']:.1f} s "
                     f"(no-adapter run: {sp['no_adapter_outside_steps_s']:.1f} s)")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a bench_workload.py JSON")
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    args = ap.parse_args(argv)
    text, out = report(json.loads(args.run.read_text()))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

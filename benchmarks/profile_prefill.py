"""Where the prefill phase of bench_engine's case b goes, with and without async scheduling (and
with eager steps launched ahead or not).

64 requests (prompt 512, 2 output tokens, one adapter for all) arrive at once, so the run is
the prefill phase: 16 steps of 2048 tokens, mixed with the first decodes. Per mode: a warm-up
run, a timed run (wall time of each step() call), and a profiled run (Chrome trace, GPU busy
fraction, the CUDA runtime calls the host spent longest in). Decode steps run eagerly
(enforce_eager: no graph capture, a faster start); they are 1 of ~17 steps here.

    python3 benchmarks/profile_prefill.py --out DIR [--layers 35] [--tiny]
"""
import argparse
import gzip
import json
import os
import time

import torch

from benchmarks.bench_engine import QWEN3_30B_A3B, TINY, case_adapters, hf_config, install, random_adapter, run_case
from engine import EngineConfig, LLMEngine


def timed_steps(engine: LLMEngine, adapters: list, prompt: int, output: int) -> dict:
    from engine import LoRARequest, SamplingParams
    params = SamplingParams(max_tokens=output, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    for k, name in enumerate(adapters):
        ids = torch.randint(0, engine.spec.vocab_size, (prompt,), generator=gen).tolist()
        engine.add_request(f"t-{k}", ids, params, None if name is None else LoRARequest(name, "/in-host-tier"))
    steps, start = [], time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        steps.append(round(1e3 * (time.perf_counter() - t0), 2))
    return {"seconds": time.perf_counter() - start, "step_ms": steps}


def profiled(engine: LLMEngine, adapters: list, prompt: int, path: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run_case(engine, adapters, prompt, 2, seed=7)
    prof.export_chrome_trace(path)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    with gzip.open(path + ".gz") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime":
            runtime[e["name"]] = runtime.get(e["name"], 0.0) + e["dur"] / 1e3
    out = {"runtime_ms": dict(sorted(runtime.items(), key=lambda kv: -kv[1])[:8])}
    if gpu:
        span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
        out.update(gpu_span_ms=span / 1e3, gpu_busy_ms=sum(e["dur"] for e in gpu) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shape, device = (TINY, "cpu") if args.tiny else (QWEN3_30B_A3B, "cuda")
    requests, prompt = (6, 20) if args.tiny else (64, 512)
    engine = LLMEngine(EngineConfig(
        hf_config=hf_config(shape, min(args.layers, shape["num_hidden_layers"])), load_format="dummy",
        device=device, max_loras=16, max_lora_rank=16, max_cpu_loras=128, max_num_seqs=requests,
        max_model_len=prompt + 32, block_size=16, max_num_batched_tokens=2048 if not args.tiny else 64,
        enforce_eager=True, seed=0))
    install(engine, ["t0/ad@v1"], [random_adapter(engine, 16, 0)])
    adapters = case_adapters("b_one", requests)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "modes": {}}
    # async_eager launches prefill steps ahead too (the policy of commit 1e75882, measured in
    # session 4); async is the default (prefill steps launched after the read-back); triton_attn
    # adds the Triton prefill attention (EngineConfig.triton_prefill_attention); the first mode
    # runs twice, so order effects show
    for mode in ("async_eager", "sync", "async", "async_triton_attn", "async_eager"):
        engine.config.async_scheduling = mode != "sync"
        engine.config.async_eager_steps = mode == "async_eager"
        engine.config.triton_prefill_attention = mode == "async_triton_attn"
        run_case(engine, adapters, prompt, 2, seed=99)
        r = timed_steps(engine, adapters, prompt, 2)
        r["profile"] = profiled(engine, adapters, prompt, os.path.join(args.out, f"prefill_{mode}.json"))
        results["modes"].setdefault(mode, []).append(r)
        print(mode, json.dumps(r), flush=True)
    with open(os.path.join(args.out, "profile_prefill.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

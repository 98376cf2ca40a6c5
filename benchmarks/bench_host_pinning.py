"""What page-locking host memory for adapter images costs a running step loop (GPU only).

A stand-in for the engine's decode loop (per iteration: a small pinned input copied to the GPU,
a CUDA graph of `--matmuls` bf16 matmuls of [`--batch`, 4096] x [4096, 4096], one int read
back) is timed alone, then beside a thread bringing `--images` fresh images of `--image-mib`
MiB into host memory one after another, as the host tier's loader threads do when new adapters
arrive:
- `torch_pinned`: `torch.zeros(n, pin_memory=True)` per image, kept (what the host tier did
  before engine.lora.host_arena: torch's pinned allocator asks the driver for each new block);
- `arena`: a HostArena (pinned a piece at a time, with pauses) hands out each image, zeroed.
For each: the loop's iteration p50 / p99 / max ms and how many iterations took over 2x the
alone p50 and their ms in all (compare these and the max: the two modes' runs differ in length),
with the loads' own seconds per image and the seconds spent in the driver.

    python benchmarks/bench_host_pinning.py --out pin.json   # H200: ~1 minute
"""
import argparse
import sys
import threading
import time

import torch

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.provenance import provenance, write_results

from engine.lora.host_arena import PIECE_BYTES, HostArena, cuda_host_register


def step_loop(opts):
    """A callable running one iteration of the stand-in, and its graph's inputs kept alive."""
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(opts.batch, 4096, device="cuda", dtype=torch.bfloat16)
    host_in = torch.zeros(opts.batch, dtype=torch.int64, pin_memory=True)
    dev_in = torch.zeros(opts.batch, dtype=torch.int64, device="cuda")
    out = torch.zeros(1, dtype=torch.int64, device="cuda")

    def body():
        y = x
        for _ in range(opts.matmuls):
            y = torch.tanh(y @ w)
        out.copy_((y[:, 0] > 0).sum() + dev_in[0])

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        body()  # warm the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    def iteration():
        dev_in.copy_(host_in, non_blocking=True)
        graph.replay()
        return int(out.item())
    return iteration


def timed(iteration, seconds: float, until=None) -> list[float]:
    """Iteration times (s) for `seconds`, or until `until` is set (at least `seconds`)."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or (until is not None and not until.is_set()):
        began = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - began)
    return times


def summary(times: list[float], reference_p50: float | None = None) -> dict:
    ordered = sorted(times)
    pick = lambda q: round(1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    out = {"n": len(times), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0)}
    if reference_p50 is not None:
        out["over_2x_alone_p50"] = sum(t * 1e3 > 2 * reference_p50 for t in times)
        out["ms_over_2x_alone_p50"] = round(sum(1e3 * t for t in times if t * 1e3 > 2 * reference_p50), 1)
    return out


def beside(iteration, load_one, opts, reference_p50: float) -> dict:
    """The loop beside a thread running `load_one()` `--images` times in a row."""
    done, load_seconds = threading.Event(), []

    failed = []

    def loads():
        try:
            for _ in range(opts.images):
                began = time.perf_counter()
                load_one()
                load_seconds.append(round(time.perf_counter() - began, 3))
        except BaseException as exc:  # the loop stops with it; raised again below
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=loads)
    thread.start()
    times = timed(iteration, opts.settle_s, until=done)
    thread.join()
    if failed:
        raise failed[0]
    return {"loop": summary(times, reference_p50), "load_seconds": load_seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-mib", type=int, default=280, help="one image: 280 MB is a rank-16 adapter on every "
                   "target of Qwen3-30B-A3B at 8 layers")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--matmuls", type=int, default=24)
    p.add_argument("--alone-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=1.0, help="at least this long beside each set of loads")
    p.add_argument("--piece-mib", type=int, default=PIECE_BYTES >> 20)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_host_pinning needs a CUDA GPU", file=sys.stderr)
        return 2
    iteration = step_loop(opts)
    alone = summary(timed(iteration, opts.alone_s))
    numel = (opts.image_mib << 20) // 2
    results = {"alone": alone}

    kept: list[torch.Tensor] = []
    results["torch_pinned"] = beside(
        iteration, lambda: kept.append(torch.zeros(numel, dtype=torch.bfloat16, pin_memory=True)), opts,
        alone["p50_ms"])
    kept.clear()
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None:  # its blocks go back to the driver before the arena pins
        empty_host_cache()

    registered = []  # pieces, unregistered at the end

    def register(ptr: int, nbytes: int) -> bool:
        ok = cuda_host_register(ptr, nbytes)
        if ok:
            registered.append(ptr)
        return ok

    piece = opts.piece_mib << 20
    per_image = -(-(opts.image_mib << 20) // piece) * piece  # each image a chunk of whole pieces
    arena = HostArena(torch.bfloat16, opts.images * per_image, opts.image_mib << 20, pin=True, piece_bytes=piece,
                      register=register, unregister=lambda ptr: None)  # unregistered below

    def arena_image():
        image = arena.allocate(numel)
        assert image is not None, "the arena's limit is too small for the images"
        kept.append(image.zero_())
    results["arena"] = beside(iteration, arena_image, opts, alone["p50_ms"])
    results["arena"].update(pieces=len(registered), driver_seconds=round(arena.pin_seconds, 3),
                            pinned_bytes=arena.pinned_bytes, unpinned_images=arena.unpinned_images)
    kept.clear()
    for ptr in registered:
        torch.cuda.cudart().cudaHostUnregister(ptr)

    for mode in ("torch_pinned", "arena"):
        r = results[mode]
        print(f"{mode}: loop {r['loop']}; loads s {r['load_seconds']}")
    print(f"alone: {alone}")
    write_results({"provenance": provenance(list(sys.argv if argv is None else argv)), "config": vars(opts),
                   "device": torch.cuda.get_device_name(), **results}, opts.out, "bench_host_pinning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The rate of a slot copy (host to device, as SlotPools writes an adapter image) beside other work
(GPU only): what slows case d's copies during decode.

One pinned image of `--image-gib` GiB goes to the device in pieces of `--piece-mib` MiB, at most
`--depth` in flight on a side stream (SlotPools._upload's loop), timed from its first piece to its
last piece's event, `--repeats` times, under each condition:
- `idle`: nothing else;
- `hbm`: a second stream copying `--hbm-gib` GiB device to device over and over (a decode step
  reads weights at ~80% of the HBM's rate; this reads and writes at the copy rate);
- `matmul`: a second stream running bf16 matmuls of 8192 x 8192 (compute-bound);
- `gil`: the main thread running Python in 4 ms bursts with 1 ms pauses (a step loop's host
  work), the copies from a thread as the engine's copier issues them;
- `hbm+gil`: both.

    python benchmarks/bench_copy_contention.py --out copy.json
"""
import argparse
import json
import sys
import threading
import time
from collections import deque

import torch

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.provenance import provenance, write_results


def upload(dst: torch.Tensor, src: torch.Tensor, piece: int, depth: int, stream: torch.cuda.Stream) -> float:
    """Seconds from the first piece issued to the last one landed."""
    queued: deque = deque()
    with torch.cuda.stream(stream):
        first = torch.cuda.Event(enable_timing=True)
        first.record(stream)
        for at in range(0, src.numel(), piece):
            if len(queued) == depth:
                queued.popleft().synchronize()
            dst[at:at + piece].copy_(src[at:at + piece], non_blocking=True)
            queued.append(stream.record_event())
        last = torch.cuda.Event(enable_timing=True)
        last.record(stream)
    last.synchronize()
    return first.elapsed_time(last) / 1e3


class Background:
    """Work on its own stream (or the main thread's Python) until stopped."""

    def __init__(self, kind: str, hbm_gib: float):
        self.kind, self.stop = kind, threading.Event()
        self.stream = torch.cuda.Stream()
        if "hbm" in kind:
            n = int(hbm_gib * 2**30) // 2
            self.a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
            self.b = torch.empty_like(self.a)
        if kind == "matmul":
            self.x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        self.threads = []

    def _gpu(self):
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                for _ in range(4):
                    if "hbm" in self.kind:
                        self.b.copy_(self.a)
                    else:
                        self.x = torch.tanh(self.x @ self.x) / 64
                self.stream.synchronize()

    def __enter__(self):
        if self.kind != "idle" and self.kind != "gil":
            self.threads.append(threading.Thread(target=self._gpu, daemon=True))
        for t in self.threads:
            t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()
        torch.cuda.synchronize()


def timed(kind: str, args, dst, src, stream) -> list[float]:
    piece = args.piece_mib * 2**20 // src.element_size()
    with Background(kind, args.hbm_gib):
        if "gil" not in kind:
            return [upload(dst, src, piece, args.depth, stream) for _ in range(args.repeats)]
        out, done = [], threading.Event()

        def copier():
            out.extend(upload(dst, src, piece, args.depth, stream) for _ in range(args.repeats))
            done.set()
        thread = threading.Thread(target=copier)
        thread.start()
        while not done.is_set():  # the step loop's host work
            began = time.perf_counter()
            while time.perf_counter() - began < 0.004:
                pass
            time.sleep(0.001)
        thread.join()
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-gib", type=float, default=1.5)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hbm-gib", type=float, default=4.0)
    ap.add_argument("--conditions", nargs="+", default=["idle", "hbm", "matmul", "gil", "hbm+gil"])
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    n = int(args.image_gib * 2**30) // 2
    src = torch.randn(n // 1024, dtype=torch.bfloat16).repeat(1024).pin_memory()
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    upload(dst, src, args.piece_mib * 2**20 // 2, args.depth, stream)  # warm
    results = {"provenance": provenance(sys.argv if argv is None else argv), "args": vars(args), "conditions": {}}
    for kind in args.conditions:
        seconds = timed(kind, args, dst, src, stream)
        rates = sorted(src.numel() * 2 / s / 1e9 for s in seconds)
        results["conditions"][kind] = {"GBps_median": rates[len(rates) // 2], "GBps_min": rates[0], "GBps_max": rates[-1]}
        print(f"{kind:<8} {rates[len(rates) // 2]:6.1f} GB/s (min {rates[0]:.1f}, max {rates[-1]:.1f})", flush=True)
    write_results(results, args.out or None, "copy_contention")
    print(json.dumps(results["conditions"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the front processes' threads spend a flood, from `bench_floods.py --py-spy DIR`.

    python benchmarks/spy_summary.py DIR [--flood base_hog] [--top 12]

Each DIR/<flood>_<role>_<pid>.txt holds py-spy's collapsed stacks of the samples that found a
thread on a CPU (py-spy leaves out a thread the OS shows waiting), the first frame naming the
thread; the .log beside it says the rate and the seconds. For every process and thread: the share
of the flood it was on a CPU, and the leaf frames and the frames anywhere on the stack (inclusive)
that took most of it. An event loop's thread on a CPU most of a flood delays every request it
serves by the turns ahead of it.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# py-spy's first line: "Sampling process 200 times a second for 20 seconds."
SAMPLING = re.compile(r"Sampling process (\d+) times a second for (\d+) seconds")


@dataclass
class ThreadSamples:
    samples: int = 0
    leaves: Counter = field(default_factory=Counter)  # samples by leaf frame
    frames: Counter = field(default_factory=Counter)  # samples by frame anywhere on the stack


def read_collapsed(text: str) -> dict[str, ThreadSamples]:
    """Thread name -> its samples, from collapsed stacks ("thread;frame;... count" lines)."""
    threads: dict[str, ThreadSamples] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        first, *frames = stack.split(";")
        # "thread (123): AsyncIO Thread: default" -> by name; an unnamed thread by its id
        name = re.sub(r"^thread \(\d+\): ", "", first)
        thread = threads.setdefault(name, ThreadSamples())
        n = int(count)
        thread.samples += n
        thread.leaves[frames[-1] if frames else first] += n
        for frame in set(frames):
            thread.frames[frame] += n
    return threads


def expected_samples(log_text: str) -> int | None:
    """Samples a thread on a CPU the whole run would have: rate x seconds from py-spy's log."""
    found = SAMPLING.search(log_text)
    return int(found[1]) * int(found[2]) if found else None


def summary(directory: Path, flood: str | None = None, top: int = 12) -> str:
    lines = []
    for path in sorted(directory.glob("*.txt")):
        if flood and not path.name.startswith(f"{flood}_"):
            continue
        log = path.with_suffix(".log")
        full = expected_samples(log.read_text()) if log.exists() else None
        threads = read_collapsed(path.read_text())
        lines.append(f"== {path.stem}: {sum(t.samples for t in threads.values())} samples on a CPU"
                     + (f" (a thread busy throughout: {full})" if full else ""))
        for name, thread in sorted(threads.items(), key=lambda kv: -kv[1].samples):
            scale = full or thread.samples  # without the log: shares of the thread's own samples
            share = f"on a CPU {thread.samples / full:.0%} of the run" if full else f"{thread.samples} samples"
            lines.append(f"  {name}: {share}")
            for frame, n in thread.leaves.most_common(top):
                lines.append(f"    self {n / scale:6.1%}  {frame}")
            deep = [(f, n) for f, n in thread.frames.most_common(4 * top)
                    if "_bootstrap" not in f and "Thread.run" not in f][:top]
            for frame, n in deep:
                lines.append(f"    incl {n / scale:6.1%}  {frame}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--flood", default=None, help="only this flood's files")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print(summary(args.directory, args.flood, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

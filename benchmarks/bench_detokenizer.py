"""Host time of streaming detokenisation for one long output (CPU: the detokenizer is host code).

One sequence of N random ids from the tiny checkpoint's byte-level tokenizer, streamed id by id
through engine.detokenizer.IncrementalDetokenizer, with its head moving (the engine's setting)
and with the head fixed (a full decode every id, as before the head existed). Prints the ms per
id at several lengths and checks both streams against tokenizer.decode. Then one decode call at
the lengths the moving head decodes, by the detokenizer's route and by `tokenizer.decode`,
alternated, the best of several repeats each (the streams' ms per id wander by 2x between runs
on a shared 2-core box; single calls timed side by side do not).

    python benchmarks/bench_detokenizer.py [--ids 4000] [--out bench_detok.json]
"""
import argparse
import json
import pathlib
import random
import sys
import tempfile
import time
import timeit

from transformers import AutoTokenizer

from engine.detokenizer import WINDOW, IncrementalDetokenizer, decode_route
from engine.testing.checkpoints import make_tiny_checkpoint

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance


def stream_ms(tokenizer, ids: list[int], window: int, marks: list[int]) -> dict:
    detok, text, out, start = IncrementalDetokenizer(tokenizer, window=window), "", {}, time.perf_counter()
    last, last_k = start, 0
    for k in range(1, len(ids) + 1):
        text += detok.update(ids[:k], k == len(ids))[0]
        if k in marks:
            now = time.perf_counter()
            out[k] = 1e3 * (now - last) / (k - last_k)  # ms per id since the previous mark
            last, last_k = now, k
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    return out


def decode_call_us(tokenizer, rng: random.Random, lengths=(8, 70, 130), rounds: int = 5) -> dict:
    """Microseconds of one decode of n ids: {n: {"detokenizer": us, "tokenizer_decode": us}}."""
    route, out = decode_route(tokenizer), {}
    for n in lengths:
        ids = [rng.randrange(len(tokenizer)) for _ in range(n)]
        assert route(ids) == tokenizer.decode(ids, skip_special_tokens=True)
        calls = {"detokenizer": lambda: route(ids),
                 "tokenizer_decode": lambda: tokenizer.decode(ids, skip_special_tokens=True)}
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(rounds):
            for name, call in calls.items():
                best[name] = min(best[name], min(timeit.repeat(call, number=1000, repeat=3)) / 1000 * 1e6)
        out[n] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=4000)
    ap.add_argument("--out", default="bench_detok.json")
    args = ap.parse_args()
    ckpt = make_tiny_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny", "qwen3_moe", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(args.ids)]
    marks = sorted({m for m in (100, 500, 1000, 2000, 4000, args.ids) if m <= args.ids})
    results = {"provenance": provenance(sys.argv), "ids": args.ids,
               "moving_head_ms_per_id": stream_ms(tokenizer, ids, WINDOW, marks),
               "full_decode_ms_per_id": stream_ms(tokenizer, ids, 10 ** 9, marks),
               "decode_call_us": decode_call_us(tokenizer, rng)}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("| ids up to | moving head ms/id | full decode ms/id |\n|---|---|---|")
    for m in marks:
        print(f"| {m} | {results['moving_head_ms_per_id'][m]:.3f} | {results['full_decode_ms_per_id'][m]:.3f} |")
    print("\n| ids in one decode | detokenizer's route us | tokenizer.decode us |\n|---|---|---|")
    for n, us in results["decode_call_us"].items():
        print(f"| {n} | {us['detokenizer']:.1f} | {us['tokenizer_decode']:.1f} |")


if __name__ == "__main__":
    main()

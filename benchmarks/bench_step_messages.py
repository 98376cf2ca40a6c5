"""Bytes and pickling time of the engine core's message to its replica, step by step (CPU).

engine.core_process sends the replica's process each step's RequestOutputs as one pickled message
(multiprocessing.connection). This decodes `--seqs` sequences for `--tokens` tokens each on the
tiny checkpoint, every step pickling and unpickling that step's outputs as the connection does,
and prints the message's bytes and microseconds at several output positions. The bytes depend on
the code only; the times on the machine (the best of 5 round trips a step). Run it from two trees
to compare what they send.

    python benchmarks/bench_step_messages.py [--seqs 64] [--tokens 1000] [--out bench_step_messages.json]
"""
import argparse
import json
import pathlib
import pickle
import sys
import tempfile
import time

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.testing.checkpoints import make_tiny_checkpoint

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance


def round_trip_us(outputs: list, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pickle.loads(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--out", default="bench_step_messages.json")
    args = ap.parse_args()
    ckpt = make_tiny_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny", "qwen3_moe", seed=1)
    engine = LLMEngine(EngineConfig(model=ckpt, max_loras=0, block_size=16, max_num_seqs=args.seqs,
                                    max_model_len=args.tokens + 32))
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(f"cmpl-{i:032x}", "The quick brown fox", params)
    marks = sorted({m for m in (1, 100, args.tokens // 2, args.tokens - 1) if 0 < m < args.tokens})
    by_position: dict[int, dict] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        decoding = [o for o in outputs if not o.finished]  # the last token's output carries the text by design
        if len(decoding) == args.seqs and (position := decoding[0].num_output_tokens) in marks:
            size = len(pickle.dumps(decoding, protocol=pickle.HIGHEST_PROTOCOL))
            by_position[position] = {"bytes": size, "round_trip_us": round_trip_us(decoding)}
    engine.shutdown()
    results = {"provenance": provenance(sys.argv), "seqs": args.seqs, "tokens": args.tokens,
               "message_at_output_position": by_position}
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"| output position | message bytes ({args.seqs} sequences) | pickle + unpickle us |\n|---|---|---|")
    for position, m in sorted(by_position.items()):
        print(f"| {position} | {m['bytes']} | {m['round_trip_us']:.0f} |")


if __name__ == "__main__":
    main()

"""Host time of a decode step's inputs (CPU: engine.step_inputs is host code).

`build_step_inputs` over B decoding sequences of a given prompt and output length, with
`Sequence.token_ids` as it is and with the slice of the concatenated prompt and output that
it was before (patched in for the second timing), alternated, the best of several repeats each.
Every decode step of the engine builds these lists, on the host, before its launch.

    python benchmarks/bench_step_inputs.py [--seqs 256] [--out bench_step_inputs.json]
"""
import argparse
import random
import sys
import timeit
from unittest import mock

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.step_inputs import build_step_inputs

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.provenance import provenance, write_results

BLOCK = 16


def concatenated_token_ids(self, start: int, end: int) -> list[int]:
    """`Sequence.token_ids` as it was: a decode position past the prompt copied prompt + output."""
    n = len(self.prompt_token_ids)
    if end <= n:
        return self.prompt_token_ids[start:end]
    known = (self.prompt_token_ids + self.output_token_ids)[start:end]
    return known + [0] * (end - start - len(known))


def decoding(num_seqs: int, prompt: int, output: int, rng: random.Random) -> list[tuple[Sequence, int]]:
    """Sequences mid-decode: their last output token is the step's one new token."""
    scheduled = []
    for i in range(num_seqs):
        seq = Sequence(i, f"r{i}", [rng.randrange(150_000) for _ in range(prompt)], SamplingParams(max_tokens=1 << 20))
        seq.output_token_ids = [rng.randrange(150_000) for _ in range(output)]
        seq.num_computed_tokens = prompt + output - 1
        seq.block_table = list(range(-(-(prompt + output) // BLOCK)))
        scheduled.append((seq, 1))
    return scheduled


def step_ms(scheduled, rounds: int) -> dict:
    """ms of one build_step_inputs call, each way, best of `rounds` alternated repeats."""
    build = lambda: build_step_inputs(scheduled, BLOCK)  # noqa: E731
    assert build() == _with_concatenation(build)
    best = {"sliced": float("inf"), "concatenated": float("inf")}
    for _ in range(rounds):
        best["sliced"] = min(best["sliced"], min(timeit.repeat(build, number=20, repeat=3)) / 20 * 1e3)
        best["concatenated"] = min(best["concatenated"], _with_concatenation(
            lambda: min(timeit.repeat(build, number=20, repeat=3)) / 20 * 1e3))
    return {k: round(v, 3) for k, v in best.items()}


def _with_concatenation(call):
    with mock.patch.object(Sequence, "token_ids", concatenated_token_ids):
        return call()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rng, rows = random.Random(0), []
    for prompt, output in ((512, 128), (2048, 512), (4000, 96)):
        rows.append({"seqs": args.seqs, "prompt": prompt, "output": output,
                     **step_ms(decoding(args.seqs, prompt, output, rng), args.rounds)})
        print(rows[-1])
    write_results({"provenance": provenance(sys.argv), "rows": rows}, args.out, "bench_step_inputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

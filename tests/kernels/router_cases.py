"""kernels/moe/router.py under TRITON_INTERPRET=1 against route_topk_ref and a per-row fp64 sort.

Run as `python -m tests.kernels.router_cases` with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1 in
the environment (test_router.py does so in a subprocess, so that the interpreter setting never
leaks into other test modules). Prints one JSON object per case.
"""
import math
import zlib

import torch

from tests.kernels.interp import errors_raised, print_cases

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXPERTS, TOP_KS, TOKENS = (8, 60, 128), (1, 2, 8), (1, 3, 17, 64)


def distinct_logits(t: int, e: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[T, E] random logits with no two equal in a row after the cast.

    fp16/bf16 randn rows have ties: the tied entries are drawn again (a few passes), and a row
    still tied becomes a random permutation of E points spaced 2**-j (exact for E <= 256).
    """
    x = torch.randn(t, e, generator=gen).to(dtype)
    step = 2.0 ** -max(0, math.floor(math.log2(max(e, 1) / 4)))
    for row in range(t):
        for _ in range(20):
            _, inverse, counts = torch.unique(x[row], return_inverse=True, return_counts=True)
            tied = counts[inverse] > 1
            if not tied.any():
                break
            x[row, tied] = torch.randn(int(tied.sum()), generator=gen).to(dtype)
        else:
            x[row] = ((torch.randperm(e, generator=gen) - e // 2) * step).to(dtype)
    return x


def oracle(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row in float64: softmax with math.exp, a Python sort by (-p, expert), first K."""
    weights, ids = [], []
    for row in logits.double().tolist():
        peak = max(row)
        num = [math.exp(v - peak) for v in row]
        total = sum(num)
        probs = [n / total for n in num]
        best = sorted(range(len(row)), key=lambda j: (-probs[j], j))[:top_k]
        w = [probs[j] for j in best]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append(w)
        ids.append(best)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64)


def grid_names() -> list[str]:
    return [f"route-{dt}-t{t}e{e}k{k}-{'renorm' if r else 'raw'}"
            for dt in DTYPES for e in EXPERTS for k in TOP_KS for t in TOKENS for r in (False, True)]


def case_names() -> list[str]:
    # a column slice of a wider tensor; K = E; bf16 weights out; the tie rule; a Mixtral router
    return grid_names() + ["route-fp16-t5e60k8-renorm-strided", "route-fp32-t3e8k8-raw",
                           "route-fp32-t9e60k2-renorm-bf16out", "ties-fp32", "mixtral-fp32", "errors"]


def parse(name: str) -> tuple[torch.dtype, int, int, int, bool, list[str]]:
    parts = name.split("-")
    t, rest = parts[2][1:].split("e")
    e, k = rest.split("k")
    return DTYPES[parts[1]], int(t), int(e), int(k), parts[3] == "renorm", parts[4:]


def compare(logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype) -> dict:
    """route_topk (whatever path it takes) vs the torch twin and the fp64 oracle."""
    from kernels.moe.router import route_topk, route_topk_ref
    weights, ids = route_topk(logits, top_k, renormalize, out_dtype)
    twin_w, twin_ids = route_topk_ref(logits, top_k, renormalize, out_dtype)
    want_w, want_ids = oracle(logits, top_k, renormalize)
    return {"ids_twin": torch.equal(ids, twin_ids), "ids_oracle": torch.equal(ids, want_ids),
            "ids_dtype": str(ids.dtype), "w_dtype": str(weights.dtype), "shape": list(weights.shape),
            "err_twin": float((weights.double() - twin_w.double()).abs().max()),
            "err_oracle": float((weights.double() - want_w).abs().max())}


def run_route(name: str) -> dict:
    dtype, t, e, k, renorm, extra = parse(name)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    logits = distinct_logits(t, e, dtype, gen)
    if "strided" in extra:
        wide = torch.randn(t, 2 * e, generator=gen).to(dtype)
        wide[:, 3:3 + e] = logits
        logits = wide[:, 3:3 + e]
    out_dtype = torch.bfloat16 if "bf16out" in extra else torch.float32
    return compare(logits, k, renorm, out_dtype)


def run_ties() -> dict:
    """Exactly equal logits: the lowest expert index comes first (also across padding, E=5)."""
    from kernels.moe.router import route_topk
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0] * 5, [2.0, 1.0, 2.0, 1.0, 2.0]])
    _, ids = route_topk(logits, 4, True, torch.float32)
    return {"ids": ids.tolist(), "want": [[1, 2, 4, 3], [0, 1, 2, 3], [0, 2, 4, 1]]}


def run_mixtral() -> dict:
    """Mixtral's router (topk of the logits, softmax over the K picked) = renormalize=True."""
    from kernels.moe.router import route_topk
    gen = torch.Generator().manual_seed(7)
    logits = distinct_logits(11, 8, torch.float32, gen)
    top_logits, want_ids = torch.topk(logits, 2, dim=-1)
    want_w = torch.softmax(top_logits, dim=-1)
    weights, ids = route_topk(logits, 2, True, torch.float32)
    return {"ids_equal": torch.equal(ids, want_ids), "err": float((weights - want_w).abs().max())}


def run_errors() -> dict:
    from kernels.errors import KernelInputError
    from kernels.moe.router import route_topk
    x = torch.randn(4, 6)
    calls = [lambda: route_topk(x, 0, False), lambda: route_topk(x, 7, False), lambda: route_topk(x[0], 2, False),
             lambda: route_topk(x.long(), 2, False), lambda: route_topk(x, 2, False, torch.int32),
             lambda: route_topk(torch.randn(2, 2000), 2, False)]
    return {"raised": errors_raised(calls, KernelInputError)}


def main() -> None:
    special = {"ties-fp32": run_ties, "mixtral-fp32": run_mixtral, "errors": run_errors}
    print_cases(case_names(), lambda name: special[name]() if name in special else run_route(name))


if __name__ == "__main__":
    main()

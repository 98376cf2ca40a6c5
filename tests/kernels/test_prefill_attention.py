"""Paged prefill attention (Triton, its torch twin, the engine's prefill path) vs an fp64 loop.

The Triton cases run under TRITON_INTERPRET=1 in a subprocess (`python -m
tests.kernels.test_prefill_attention` prints one JSON row per case); the GPU cases use bf16.
"""
from dataclasses import dataclass

import pytest
import torch
from tests.kernels.interp import print_cases, run_interpreter_cases

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}  # max abs error / max abs reference
# (new queries, context after the step) per sequence: one query on one key, a whole prompt,
# chunks after cached prefixes (partial blocks both ends), a sequence with no queries this step
SHAPES = ((1, 1), (5, 5), (7, 20), (17, 40), (0, 9), (3, 3))
LONG_SHAPES = ((70, 130), (1, 9), (65, 65))  # several query and key tiles at the fp16 tile sizes


@dataclass(frozen=True)
class Case:
    dtype: str
    seqs: int
    kv_heads: int
    group: int
    head_dim: int
    block_size: int
    window: int | None = None
    long: bool = False

    @property
    def name(self) -> str:
        return (f"{self.dtype}-b{self.seqs}g{self.kv_heads}x{self.group}-d{self.head_dim}s{self.block_size}"
                f"-w{self.window}{'-long' if self.long else ''}")


INTERP_CASES = [
    *(Case(dt, 2, 1, 1, 16, 4) for dt in ("fp32", "fp16")),
    *(Case(dt, 4, 2, 4, 32, 16) for dt in ("fp32", "fp16")),
    Case("fp32", 6, 2, 2, 8, 4), Case("fp16", 6, 1, 3, 24, 6),
    Case("fp32", 4, 2, 4, 16, 4, window=6), Case("fp16", 6, 1, 2, 16, 16, window=9),
    Case("fp16", 3, 2, 2, 16, 16, window=40, long=True), Case("fp16", 3, 1, 4, 32, 16, long=True),
    Case("fp32", 3, 2, 2, 16, 4, long=True),
]
GPU_CASES = [Case("bf16", 6, 4, 8, 128, 16), Case("bf16", 6, 2, 4, 64, 16, window=24),
             Case("fp16", 6, 4, 8, 128, 16), Case("fp32", 6, 2, 2, 64, 16)]


def make_inputs(case: Case, shapes, seed: int = 0, device: str = "cpu", scale_q: int = 1):
    """Random q (rows of each sequence back to back) and caches; shuffled block ids; the block
    table a column slice of a wider one, padded with 0 past each context."""
    gen = torch.Generator().manual_seed(seed)
    dtype, s = DTYPES[case.dtype], case.block_size
    shapes = [(q * scale_q, c * scale_q) for q, c in shapes]
    blocks_per_seq = [-(-c // s) for _, c in shapes]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(shapes), width + 2, dtype=torch.long)
    for b, n in enumerate(blocks_per_seq):
        table[b, 1:n + 1] = torch.tensor([ids.pop() for _ in range(n)])
    table = table.to(device)[:, 1:width + 1]
    starts = torch.tensor([0] + [q for q, _ in shapes]).cumsum(0)
    ctx = torch.tensor([c for _, c in shapes])
    heads = case.kv_heads * case.group
    cache_shape = (num_blocks, s, case.kv_heads, case.head_dim)
    k_cache, v_cache = (torch.randn(cache_shape, generator=gen).to(dtype).to(device) for _ in range(2))
    q = torch.randn(int(starts[-1]), heads, case.head_dim, generator=gen).to(dtype).to(device)
    return q, k_cache, v_cache, table, starts.to(device), ctx.to(device), max(q for q, _ in shapes)


def loop_ref(q, k_cache, v_cache, table, starts, ctx, scale, window=None):
    """fp64, one query and one head at a time: its visible keys in order, then softmax."""
    q, k_cache, v_cache, table = (t.cpu().double() if t.is_floating_point() else t.cpu()
                                  for t in (q, k_cache, v_cache, table))
    heads, s = q.shape[1], k_cache.shape[1]
    group = heads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(table.shape[0]):
        lo, hi, c = int(starts[b]), int(starts[b + 1]), int(ctx[b])
        for i, t in enumerate(range(lo, hi)):
            pos = c - (hi - lo) + i
            visible = [j for j in range(pos + 1) if window is None or j > pos - window]
            slots = [(int(table[b, j // s]), j % s) for j in visible]
            keys = torch.stack([k_cache[blk, row] for blk, row in slots])
            values = torch.stack([v_cache[blk, row] for blk, row in slots])
            for h in range(heads):
                w = torch.softmax(keys[:, h // group] @ q[t, h] * scale, dim=0)
                out[t, h] = w @ values[:, h // group]
    return out


def rel_err(got, want) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max()).item()


def shapes_for(case: Case):
    shapes = LONG_SHAPES if case.long else SHAPES
    return [shapes[b % len(shapes)] for b in range(case.seqs)]


def run_case(case: Case, device: str = "cpu", scale_q: int = 1) -> dict:
    from kernels.attention.prefill_attention import paged_prefill_attention
    q, k, v, table, starts, ctx, max_q = make_inputs(case, shapes_for(case), case.seqs + case.head_dim,
                                                     device, scale_q)
    scale = case.head_dim ** -0.5
    got = paged_prefill_attention(q, k, v, table, starts, ctx, scale, case.window, max_query_len=max_q)
    want = loop_ref(q, k, v, table, starts, ctx, scale, case.window)
    return {"err": rel_err(got, want), "tol": TOL[case.dtype], "dtype_ok": got.dtype == q.dtype,
            "finite": bool(torch.isfinite(got).all())}


def run_engine_prefill() -> dict:
    """engine.attention.paged_attention on a decode group + a prefill group with the Triton
    prefill path on, against the fp64 loop (the decode rows through the decode kernel)."""
    from engine.attention import AttentionGroup, ForwardBatch, paged_attention
    case = Case("fp32", 4, 2, 2, 16, 4)
    shapes = [(1, 6), (1, 1), (5, 9), (7, 7)]
    q, k, v, table, starts, ctx, _ = make_inputs(case, shapes, seed=5)
    pos = torch.cat([torch.arange(c - n, c) for n, c in shapes])
    decode = AttentionGroup(0, 2, table[:2], torch.arange(2), torch.zeros(2, dtype=torch.long), 1, 6)
    prefill = AttentionGroup(2, 14, table[2:], torch.tensor([0] * 5 + [1] * 7), torch.tensor(list(range(5)) + list(range(7))),
                             7, 9, query_start=starts[2:] - 2, context_lens=ctx[2:])
    batch = ForwardBatch(pos, pos.clone(), [decode, prefill], triton_prefill=True)
    got = paged_attention(q, k, v, batch, 0.25, sliding_window=5)
    want = loop_ref(q, k, v, table, starts, ctx, 0.25, 5)
    return {"err": rel_err(got, want), "tol": TOL["fp32"], "dtype_ok": True, "finite": bool(torch.isfinite(got).all())}


NAMED = {**{c.name: c for c in INTERP_CASES}}


def run_named(name: str) -> dict:
    return run_engine_prefill() if name == "engine-prefill" else run_case(NAMED[name])


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.test_prefill_attention")


@pytest.mark.parametrize("name", list(NAMED) + ["engine-prefill"])
def test_triton_prefill_matches_fp64_loop(interp_results, name):
    res = interp_results[name]
    assert res["finite"] and res["dtype_ok"], res
    assert res["err"] <= res["tol"], res


@pytest.mark.parametrize("case", INTERP_CASES[:4] + [c for c in INTERP_CASES if c.window], ids=lambda c: c.name)
def test_torch_twin_matches_fp64_loop(case):
    from kernels.attention.prefill_attention import paged_prefill_attention_ref
    q, k, v, table, starts, ctx, max_q = make_inputs(case, shapes_for(case), seed=1)
    got = paged_prefill_attention_ref(q, k, v, table, starts, ctx, 0.3, case.window, max_query_len=max_q)
    assert rel_err(got, loop_ref(q, k, v, table, starts, ctx, 0.3, case.window)) <= TOL[case.dtype]


def test_bad_arguments_raise_typed_errors():
    from kernels.errors import KernelInputError
    from kernels.attention.prefill_attention import paged_prefill_attention_ref
    case = Case("fp32", 2, 1, 2, 8, 4)
    q, k, v, table, starts, ctx, max_q = make_inputs(case, shapes_for(case))
    with pytest.raises(KernelInputError, match="query_start"):
        paged_prefill_attention_ref(q, k, v, table, starts[:-1], ctx, 1.0, max_query_len=max_q)
    with pytest.raises(KernelInputError, match="multiple of KV heads"):
        paged_prefill_attention_ref(q[:, :1], k.expand(-1, -1, 2, -1).contiguous(), v.expand(-1, -1, 2, -1).contiguous(),
                                    table, starts, ctx, 1.0, max_query_len=max_q)
    with pytest.raises(KernelInputError, match="max_query_len"):
        paged_prefill_attention_ref(q, k, v, table, starts, ctx, 1.0, max_query_len=0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_prefill_matches_fp64_loop(case):
    """Real head sizes, prompts of up to 680 tokens after cached prefixes, on the GPU."""
    res = run_case(case, device="cuda", scale_q=17)
    assert res["finite"] and res["dtype_ok"], res
    assert res["err"] <= res["tol"], res


if __name__ == "__main__":
    print_cases(list(NAMED) + ["engine-prefill"], run_named)

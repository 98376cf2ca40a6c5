"""Paged decode attention (Triton, its torch twin, the engine's decode path) vs an fp64 loop.

The Triton cases run under TRITON_INTERPRET=1 in a subprocess (`python -m
tests.kernels.test_paged_attention` prints one JSON row per case), so the interpreter setting
never leaks into other test modules.
"""
import os
from dataclasses import dataclass

import pytest
import torch
from tests.kernels.interp import print_cases, run_interpreter_cases

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}  # max abs error / max abs reference
CONTEXTS = (1, 5, 37)  # one key, a partial first block, several blocks with a partial last one


@dataclass(frozen=True)
class Case:
    dtype: str
    seqs: int          # B
    kv_heads: int      # G
    group: int         # H / G
    head_dim: int
    block_size: int
    window: int | None = None
    partitions: int | None = None
    padded_row: bool = False  # the last row is a CUDA-graph pad: table of 0s, position 0
    poisoned: bool = False  # every cache row no sequence sees holds NaN (another sequence's broken KV)

    @property
    def name(self) -> str:
        return (f"{self.dtype}-b{self.seqs}g{self.kv_heads}x{self.group}-d{self.head_dim}s{self.block_size}"
                f"-w{self.window}-p{self.partitions}{'-pad' if self.padded_row else ''}"
                f"{'-nan' if self.poisoned else ''}")


INTERP_CASES = [
    *(Case(dt, 1, 1, 1, 16, 4) for dt in ("fp32", "fp16")),
    *(Case(dt, 3, 2, 4, 32, 16) for dt in ("fp32", "fp16")),
    *(Case(dt, 5, 2, 1, 32, 4, padded_row=True) for dt in ("fp32", "fp16")),
    Case("fp32", 5, 1, 4, 16, 16),
    Case("fp32", 3, 2, 4, 16, 4, window=7),
    Case("fp16", 5, 1, 4, 32, 4, window=16),
    Case("fp32", 3, 2, 4, 16, 4, partitions=3),
    Case("fp32", 3, 2, 4, 16, 4, partitions=37),  # more partitions than key tiles: most are empty
    # head dims and block sizes that are not powers of two (the tiny checkpoints use Dh 8)
    Case("fp32", 3, 2, 2, 8, 16), Case("fp16", 3, 1, 3, 24, 6, partitions=2),
    Case("fp16", 5, 2, 1, 16, 16, window=9, partitions=2, padded_row=True),
    Case("fp32", 3, 2, 4, 16, 4, partitions=2, poisoned=True),
]


def make_inputs(case: Case, contexts, seed: int = 0, device: str = "cpu"):
    """Random q and caches, shuffled non-contiguous block ids, a block table that is a column
    slice of a wider one (as the CUDA graphs pass it) padded with 0 past each context."""
    gen = torch.Generator().manual_seed(seed)
    dtype, s = DTYPES[case.dtype], case.block_size
    heads = case.kv_heads * case.group
    blocks_per_seq = [-(-c // s) for c in contexts]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 is the graphs' scratch
    table = torch.zeros(len(contexts), width + 2, dtype=torch.long)
    for b, n in enumerate(blocks_per_seq):
        table[b, 1:n + 1] = torch.tensor([ids.pop() for _ in range(n)])
    positions = torch.tensor(contexts) - 1
    if case.padded_row:
        table[-1], positions[-1] = 0, 0
    table = table.to(device)[:, 1:width + 1]  # a column slice: row stride width + 2
    shape = (num_blocks, s, case.kv_heads, case.head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(len(contexts), heads, case.head_dim, generator=gen).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), table, to(positions)


def poison_unseen(k_cache, v_cache, block_tables, positions) -> None:
    """NaN in every cache row that no sequence's query sees (rows up to its position), in place:
    what a block can hold from a sequence whose adapter overflowed, before it was reused."""
    seen = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    size = k_cache.shape[1]
    for b in range(block_tables.shape[0]):
        for j in range(int(positions[b]) + 1):
            seen[block_tables[b, j // size], j % size] = True
    k_cache[~seen] = float("nan")
    v_cache[~seen] = float("nan")


def loop_ref(q, k_cache, v_cache, block_tables, positions, scale, window=None):
    """fp64, one sequence and one head at a time: its visible keys in order, then softmax."""
    q, k_cache, v_cache, block_tables, positions = (t.cpu() for t in (q, k_cache, v_cache, block_tables, positions))
    num_seqs, heads, _ = q.shape
    group = heads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(num_seqs):
        pos = int(positions[b])
        visible = [j for j in range(pos + 1) if window is None or j > pos - window]
        slots = [(int(block_tables[b, j // k_cache.shape[1]]), j % k_cache.shape[1]) for j in visible]
        keys = torch.stack([k_cache[blk, row] for blk, row in slots]).double()    # [C, G, Dh]
        values = torch.stack([v_cache[blk, row] for blk, row in slots]).double()  # [C, G, Dh]
        for h in range(heads):
            weights = torch.softmax(keys[:, h // group] @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ values[:, h // group]
    return out


def rel_err(got, want) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max()).item()


def contexts_for(case: Case) -> list[int]:
    return [CONTEXTS[b % len(CONTEXTS)] for b in range(case.seqs)]


def run_case(case: Case) -> dict:
    from kernels.attention.paged_attention import paged_decode_attention
    q, k, v, table, pos = make_inputs(case, contexts_for(case), seed=case.seqs * 7 + case.head_dim)
    if case.poisoned:
        poison_unseen(k, v, table, pos)
    scale = case.head_dim ** -0.5
    got = paged_decode_attention(q, k, v, table, pos, scale, case.window, num_partitions=case.partitions)
    want = loop_ref(q, k, v, table, pos, scale, case.window)
    return {"name": case.name, "err": rel_err(got, want), "tol": TOL[case.dtype],
            "dtype_ok": got.dtype == q.dtype, "finite": bool(torch.isfinite(got).all())}


def run_engine_decode() -> dict:
    """engine.attention.paged_attention on a decode group, Triton path vs the torch path."""
    from engine.attention import AttentionGroup, ForwardBatch, paged_attention
    case = Case("fp32", 3, 2, 4, 16, 4)
    q, k, v, table, pos = make_inputs(case, [37, 1, 5], seed=3)
    group = AttentionGroup(0, 3, table, torch.arange(3), torch.zeros(3, dtype=torch.long), 1, 37)
    batch = ForwardBatch(pos, pos.clone(), [group])
    got = paged_attention(q, k, v, batch, 0.25, sliding_window=6)
    os.environ["MOEPLEX_TRITON"] = "0"
    torch_path = paged_attention(q, k, v, batch, 0.25, sliding_window=6)
    os.environ["MOEPLEX_TRITON"] = "1"
    want = loop_ref(q, k, v, table, pos, 0.25, 6)
    return {"name": "engine-decode", "err": max(rel_err(got, want), rel_err(torch_path, want)),
            "tol": TOL["fp32"], "dtype_ok": True, "finite": bool(torch.isfinite(got).all())}


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.test_paged_attention")


@pytest.mark.parametrize("name", [c.name for c in INTERP_CASES] + ["engine-decode"])
def test_triton_decode_matches_fp64_loop(interp_results, name):
    res = interp_results[name]
    assert res["finite"] and res["dtype_ok"], res
    assert res["err"] <= res["tol"], res


@pytest.mark.parametrize("case", [Case("fp32", 5, 2, 4, 16, 4, window=7, padded_row=True),
                                  Case("fp32", 3, 1, 1, 32, 16)], ids=lambda c: c.name)
def test_torch_twin_matches_fp64_loop(case):
    from kernels.attention.paged_attention import paged_decode_attention_ref
    q, k, v, table, pos = make_inputs(case, contexts_for(case))
    got = paged_decode_attention_ref(q, k, v, table, pos, 0.3, case.window)
    assert rel_err(got, loop_ref(q, k, v, table, pos, 0.3, case.window)) <= TOL["fp32"]


def _engine_group(table, contexts, query_lens):
    """engine.attention's group of the sequences' last query_lens[b] tokens, and their positions."""
    from engine.attention import AttentionGroup
    seqs = [b for b, n in enumerate(query_lens) for _ in range(n)]
    rows = [r for n in query_lens for r in range(n)]
    positions = torch.tensor([contexts[b] - query_lens[b] + r for b, r in zip(seqs, rows)])
    group = AttentionGroup(0, len(seqs), table, torch.tensor(seqs), torch.tensor(rows), max(query_lens), max(contexts))
    return group, positions


@pytest.mark.parametrize("query_lens", [(1, 1, 1), (3, 1, 5)], ids=["decode", "prefill"])
def test_torch_paths_read_no_row_their_sequence_does_not_see(query_lens, monkeypatch):
    """A NaN left in a reused block by another sequence (its adapter overflowed) must not reach
    this sequence's output: a softmax weight of 0 times NaN is NaN, so unseen rows are zeroed."""
    from engine.attention import ForwardBatch, paged_attention
    from kernels.attention.paged_attention import paged_decode_attention_ref
    case, contexts = Case("fp32", 3, 2, 4, 16, 4), [37, 6, 5]
    _, k, v, table, _ = make_inputs(case, contexts, seed=5)
    group, positions = _engine_group(table, contexts, query_lens)
    q = torch.randn(group.end, case.kv_heads * case.group, case.head_dim, generator=torch.Generator().manual_seed(6))
    monkeypatch.delenv("MOEPLEX_TRITON", raising=False)  # the torch paths
    clean = paged_attention(q, k, v, ForwardBatch(positions, positions.clone(), [group]), 0.25)
    last = torch.tensor(contexts) - 1
    poison_unseen(k, v, table, last)
    got = paged_attention(q, k, v, ForwardBatch(positions, positions.clone(), [group]), 0.25)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)
    if max(query_lens) == 1:
        twin = paged_decode_attention_ref(q, k, v, table, last, 0.25)
        assert torch.isfinite(twin).all() and rel_err(twin, loop_ref(q, k, v, table, last, 0.25)) <= TOL["fp32"]


def test_bad_input_is_refused_with_a_message():
    from kernels.errors import KernelInputError
    from kernels.attention.paged_attention import paged_decode_attention_ref
    q, k, v, table, pos = make_inputs(Case("fp32", 3, 2, 4, 16, 4), [1, 5, 37])
    with pytest.raises(KernelInputError, match="multiple of KV heads"):
        paged_decode_attention_ref(q[:, :7], k, v, table, pos, 1.0)
    with pytest.raises(KernelInputError, match="dtype"):
        paged_decode_attention_ref(q, k.half(), v, table, pos, 1.0)
    with pytest.raises(KernelInputError, match="positions must be"):
        paged_decode_attention_ref(q, k, v, table, pos[:2], 1.0)
    with pytest.raises(KernelInputError, match="sliding_window"):
        paged_decode_attention_ref(q, k, v, table, pos, 1.0, sliding_window=0)


@pytest.mark.gpu
@pytest.mark.parametrize("partitions", [None, 1, 5])
def test_gpu_bf16_matches_fp64_loop(partitions):
    from kernels.attention.paged_attention import paged_decode_attention
    case = Case("bf16", 64, 4, 8, 128, 16, partitions=partitions, padded_row=True)
    contexts = torch.randint(1, 1001, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    q, k, v, table, pos = make_inputs(case, contexts, device="cuda")
    got = paged_decode_attention(q, k, v, table, pos, 128 ** -0.5, num_partitions=partitions)
    assert rel_err(got, loop_ref(q, k, v, table, pos, 128 ** -0.5)) <= TOL["bf16"]
    windowed = paged_decode_attention(q, k, v, table, pos, 128 ** -0.5, 100, num_partitions=partitions)
    assert rel_err(windowed, loop_ref(q, k, v, table, pos, 128 ** -0.5, 100)) <= TOL["bf16"]


def main() -> None:
    cases = {c.name: c for c in INTERP_CASES}
    print_cases(list(cases) + ["engine-decode"],
                lambda name: run_engine_decode() if name == "engine-decode" else run_case(cases[name]))


if __name__ == "__main__":
    main()


def test_partition_counts_are_powers_of_two(monkeypatch):
    """The count is a constexpr: any batch and context meet one of a few compiled values."""
    from kernels.attention import paged_attention as pa
    monkeypatch.setattr(pa, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    counts = {pa._pick_partitions(b * 4, keys, 64, cuda) for b in range(1, 65) for keys in range(16, 20000, 48)}
    assert counts == {1, 2, 4, 8, 16, 32, 64}
    assert pa._pick_partitions(4, 16 * 256, 64, cuda) == 16  # 16 partitions of 4 key tiles
    assert pa._pick_partitions(200, 16 * 256, 64, cuda) == 1  # enough programs without a split

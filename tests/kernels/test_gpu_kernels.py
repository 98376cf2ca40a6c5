"""Triton kernels on the GPU at real shapes in bf16 against the fp64 loop references."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import MoELoRAWeights
from kernels.moe.launch import fused_moe_triton
from tests.kernels.loop_reference import (SPREADS, dense_loop_ref, make_dense_lora, make_moe,
                                          make_moe_lora, make_slot_ids, moe_loop_ref, moe_lora_in_heap,
                                          moe_lora_to, rel_err, share_outer)

pytestmark = pytest.mark.gpu

D, INTER, E = 2048, 768, 60  # Qwen3-30B-A3B hidden/intermediate, a non-power-of-two expert count
RANKS = [1, 8, 16, 64, 16, 8]  # mixed in one batch
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}


def _poison_allocator():
    """Fills the caching allocator's free memory with NaN so unwritten outputs show."""
    junk = torch.empty(512 * 2**20, dtype=torch.bfloat16, device="cuda")
    junk.fill_(float("nan"))
    del junk


def _gens(seed):
    """A CUDA generator for the big draws, a CPU one for slot assignment."""
    return torch.Generator(device="cuda").manual_seed(seed), torch.Generator().manual_seed(seed)


def _check_moe(t, k, spread, dtype=torch.bfloat16, seed=0, path="auto", shape=(D, INTER, E), pad=0.0):
    """The layer with LoRA against the fp64 loop; (its inputs, the base output) for further checks."""
    d, inter, e = shape
    gen, cpu_gen = _gens(seed * 7919 + t * 31 + k)
    args = make_moe(gen, t, d, inter, e, k, dtype, "cuda")
    lora = make_moe_lora(gen, len(RANKS), e, d, inter, RANKS, dtype, "cuda", pad=pad)
    slots = make_slot_ids(spread, t, len(RANKS), cpu_gen).cuda()
    slots[0] = 3  # the rank-64 slot is always in the batch
    _poison_allocator()
    base = kernels.fused_moe(*args)
    _poison_allocator()
    got = fused_moe_triton(*args, lora=lora, slot_ids=slots, path=path)
    torch.cuda.synchronize()
    want_base = moe_loop_ref(*args)
    want = moe_loop_ref(*args, lora, slots)
    none = slots < 0
    assert torch.isfinite(got).all() and torch.isfinite(base).all()
    assert rel_err(base, want_base) <= TOL[dtype]
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(got.double() - base.double(), want - want_base) <= TOL[dtype]
    assert torch.equal(got[none], base[none])
    return args, base


@pytest.mark.parametrize("t", [1, 3, 17, 133, 1000])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_fused_moe_bf16_token_counts_and_topk(t, k):
    _check_moe(t, k, "uniform")


@pytest.mark.parametrize("t, k, path", [(64, 8, "rows"), (64, 8, "split"), (1, 8, "fused"), (1, 8, "rows"),
                                        (200, 8, "rows"), (5, 2, "split"), (64, 8, "split-tiles"),
                                        (17, 8, "split-blocks"), (64, 8, "rows-apart"), (64, 8, "rows-inplace"),
                                        (40, 8, "rows"), (8, 8, "rows")])
def test_fused_moe_bf16_each_lora_path(t, k, path):
    _check_moe(t, k, "uniform", seed=2, path=path)


@pytest.mark.parametrize("t", [1, 8, 64, 600])
def test_fused_moe_bf16_long_expert_rows_take_the_split_path(t, monkeypatch):
    """Mixtral's kind of layer (long expert rows: 2I past ROWS_MAX_EXPAND, I past SHRINK_LONG_K, top-2 of 8):
    the split path at every size, one token included; its gate/up expand by blocks cut in column parts,
    its down shrink at the long-K tiles, and at 600 tokens the base gate/up GEMM walked by groups of
    blocks, bit for bit what block by block gives."""
    from kernels.moe import launch
    d, inter, e = 1024, 8448, 8
    assert launch.lora_path(t, 2, inter) == "split" and launch._expand_blocks_config(inter)["parts"] > 1
    args, base = _check_moe(t, 2, "zipf", seed=4, shape=(d, inter, e), pad=float("nan"))
    if t == 600:
        block_m = launch._base_block_m(2 * t, e)
        assert launch._base_group_m(block_m, 2 * inter, launch._base_config(block_m)["block_n"]) > 1
        monkeypatch.setattr(launch, "_base_group_m", lambda block_m, n, block_n: 1)
        assert torch.equal(kernels.fused_moe(*args), base)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("t", [17, 1000])
def test_fused_moe_bf16_adapter_spreads(spread, t):
    _check_moe(t, 8, spread, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_moe_other_dtypes(dtype):
    _check_moe(133, 8, "zipf", dtype=dtype, seed=2)


def test_fused_moe_rows_beyond_single_program_alignment():
    """T*K = 4800 rows: the multi-program alignment (kernels/moe/align_multi.py) feeds the kernels."""
    _check_moe(600, 8, "uniform", seed=3)


@pytest.mark.parametrize("t, path", [(1, "fused"), (1, "rows"), (64, "rows"), (64, "split"), (600, "auto")])
def test_shared_outer_slots_in_the_heap_bf16_each_lora_path(t, path):
    """Slots 1 and 4 hold gate/up A and down B once (the adapter heap's shared-outer layout, NaN
    around and past every rank), beside per-expert slots of mixed ranks."""
    gen, cpu_gen = _gens(11 + t)
    args = make_moe(gen, t, D, INTER, E, 8, torch.bfloat16, "cuda")
    cpu = torch.Generator().manual_seed(t)
    padded = share_outer(make_moe_lora(cpu, len(RANKS), E, D, INTER, RANKS, torch.bfloat16), (1, 4))
    heap = moe_lora_to(moe_lora_in_heap(padded, (1, 4)), "cuda")
    slots = make_slot_ids("uniform", t, len(RANKS), cpu_gen).cuda()
    slots[0] = 1
    base = kernels.fused_moe(*args)
    got = fused_moe_triton(*args, lora=heap, slot_ids=slots, path=path)
    padded = MoELoRAWeights(*(f.padded.cuda() for f in (padded.gate_up_a, padded.gate_up_b, padded.down_a,
                                                         padded.down_b)), padded.ranks.cuda())
    want_base, want = moe_loop_ref(*args), moe_loop_ref(*args, padded, slots)
    assert torch.isfinite(got).all()
    assert rel_err(got.double() - base.double(), want - want_base) <= TOL[torch.bfloat16]
    assert torch.equal(got[slots < 0], base[slots < 0])


def test_padded_rank_is_never_read():
    gen, cpu_gen = _gens(5)
    lora = make_moe_lora(gen, len(RANKS), E, D, INTER, RANKS, torch.bfloat16, "cuda", pad=float("nan"))
    for t in (1, 640):  # the fused launch and the separate shrink/expand launches
        args = make_moe(gen, t, D, INTER, E, 8, torch.bfloat16, "cuda")
        slots = make_slot_ids("uniform", t, len(RANKS), cpu_gen).cuda()
        got = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("t", [1, 17, 1000])
def test_lora_linear_bf16(spread, t):
    gen, cpu_gen = _gens(t)
    n_in, n_out = 2048, 4096 + 128 * 3  # odd OUT: fused q/k/v of a small model
    x = torch.randn(t, n_in, generator=gen, device="cuda").to(torch.bfloat16)
    out = torch.randn(t, n_out, generator=gen, device="cuda").to(torch.bfloat16)
    lora = make_dense_lora(gen, len(RANKS), n_in, n_out, RANKS, torch.bfloat16, "cuda")
    slots = make_slot_ids(spread, t, len(RANKS), cpu_gen).cuda()
    slots[0] = 3
    want = dense_loop_ref(x, out, lora, slots)
    before = out.clone()
    kernels.lora_linear_(x, out, lora, slots)
    assert rel_err(out.double() - before.double(), want - before.double()) <= 2e-2
    assert torch.equal(out[slots < 0], before[slots < 0])


def _qkv_case(t, sections, seed):
    gen, cpu_gen = _gens(seed)
    n_in = 2048
    ranks = [RANKS, RANKS[::-1], [0, 16, 8, 64, 1, 16]]  # slot 0 leaves v alone
    parts = [make_dense_lora(gen, len(RANKS), n_in, n, ranks[h], torch.bfloat16, "cuda")
             for h, n in enumerate(sections)]
    group = kernels.DenseLoRAGroup(torch.cat([q.a.padded for q in parts], 1), torch.cat([q.b.padded for q in parts], 1),
                                   torch.stack([q.ranks for q in parts]), sections)
    x = torch.randn(t, n_in, generator=gen, device="cuda").to(torch.bfloat16)
    out = torch.randn(t, sum(sections), generator=gen, device="cuda").to(torch.bfloat16)
    slots = make_slot_ids("uniform", t, len(RANKS), cpu_gen).cuda()
    slots[0] = 0
    offs = [sum(sections[:h]) for h in range(4)]
    want = torch.cat([dense_loop_ref(x, out[:, offs[h]:offs[h + 1]], parts[h], slots) for h in range(3)], 1)
    return group, x, out, slots, want


@pytest.mark.parametrize("path", ["auto", "rows", "split"])
@pytest.mark.parametrize("t", [1, 64, 2048])
@pytest.mark.parametrize("sections", [(4096, 512, 512), (4096 + 128, 128 * 3, 128 * 3)])
def test_lora_group_qkv_bf16(t, sections, path):
    """q/k/v as one group against the fp64 loop of each projection, by the default path of the
    size (by token up to 64 tokens) and by each path asked for; the second shape's section ends
    admit only a 128-column tile on the split path."""
    from kernels.moe.dense_launch import dense_group_triton_
    if path == "rows" and t > 64:
        pytest.skip("a program per token at prefill sizes: not a configuration the engine runs")
    group, x, out, slots, want = _qkv_case(t, sections, t + len(sections))
    _poison_allocator()
    before = out.clone()
    if path == "auto":
        kernels.lora_group_linear_(x, out, group, slots)
    else:
        dense_group_triton_(x, out, group, slots, path=path)
    assert rel_err(out.double() - before.double(), want - before.double()) <= 2e-2
    assert torch.equal(out[slots < 0], before[slots < 0])


def test_lora_group_rows_capture_in_cuda_graph():
    """The q/k/v row launch replays from a CUDA graph to the eager result, bit for bit."""
    group, x, out, slots, _ = _qkv_case(64, (4096, 512, 512), 5)
    start = out.clone()
    eager = kernels.lora_group_linear_(x, start.clone(), group, slots)
    kernels.lora_group_linear_(x, out.clone(), group, slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.lora_group_linear_(x, out, group, slots)
    out.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t", [4, 64, 200])
def test_linear_lora_base_plus_group_delta_eager_and_from_a_cuda_graph(t, fused, monkeypatch):
    """linear_lora (q/k/v: cuBLAS then the group's delta, launched with PDL beside the GEMM's end; or,
    switched on, up to 64 tokens the one launch of base GEMM, shrink and expand) equals the base plus
    the fp64 loop's delta, leaves tokens without an adapter equal bit for bit to the call without
    LoRA, keeps the base within bf16 rounding of cuBLAS, and replays from a CUDA graph to the eager
    result."""
    from kernels.moe import dense_gemm
    if fused and t > dense_gemm.FUSED_MAX_TOKENS:
        pytest.skip("above decode size linear_lora takes cuBLAS and the split path either way")
    monkeypatch.setattr(dense_gemm, "ENABLED", fused)
    sections = (4096, 512, 512)
    group, x, out, slots, want = _qkv_case(t, sections, 40 + t)
    slots[-1] = -1  # a token without an adapter at every size (the case's slots may have none)
    delta = want - out.double()  # the fp64 loop's delta
    delta[-1] = 0
    gen = torch.Generator(device="cuda").manual_seed(t)
    weight = (torch.randn(sum(sections), x.shape[1], generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    base = kernels.linear_lora(x, weight, None, None, None)  # the same base sums as with LoRA
    assert rel_err(base, F.linear(x, weight)) <= 1e-2
    layout = kernels.dense_lora_layout(slots, group.num_slots)
    eager = kernels.linear_lora(x, weight, None, group, slots, layout)
    assert rel_err(eager.double() - base.double(), delta) <= 2e-2
    assert torch.equal(eager[slots < 0], base[slots < 0])
    static_x = torch.zeros_like(x)  # captured on other values: the replay must read x afresh
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.linear_lora(static_x, weight, None, group, slots, layout)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("t", [16, 40, 64, 200])  # the split path (padded stacks take rows up to 8 tokens)
def test_linear_lora_shrink_on_a_side_stream_equals_one_stream_eager_and_from_a_cuda_graph(t, monkeypatch):
    """dense_launch.SIDE_STREAM: the split path's shrink on a second stream beside cuBLAS, its expand
    after the join. The same kernels on the same inputs: the output equals the one-stream call bit
    for bit, eagerly and replayed from a CUDA graph (the fork and join captured), with x written by a
    launch on the calling stream just before the call, which the side stream must wait for."""
    from kernels.moe import dense_launch
    sections = (4096, 512, 512)
    group, x, _, slots, _ = _qkv_case(t, sections, 70 + t)
    slots[-1] = -1
    gen = torch.Generator(device="cuda").manual_seed(t)
    weight = (torch.randn(sum(sections), x.shape[1], generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    layout = kernels.dense_lora_layout(slots, group.num_slots)
    one_stream = kernels.linear_lora(x, weight, None, group, slots, layout)
    monkeypatch.setattr(dense_launch, "SIDE_STREAM", True)
    assert dense_launch.side_stream_ok(x, group, layout)
    torch.cuda._sleep(1_000_000)  # the calling stream busy, then x's values written there
    fresh = x * 1
    side = kernels.linear_lora(fresh, weight, None, group, slots, layout)
    torch.cuda.synchronize()
    assert torch.equal(side, one_stream)
    static_x = torch.zeros_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.linear_lora(static_x * 1, weight, None, group, slots, layout)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, one_stream)


@pytest.mark.parametrize("t", [1, 16, 40, 64])
def test_fused_dense_launch_bf16_on_the_heap_with_bias_matches_fp64_loop(t):
    """The fused dense launch (kernels/moe/dense_gemm.py) at decode sizes on the adapter heap (each
    slot at its own rank, NaN around), o-like and q/k/v-like, with a bias: against base + the fp64
    loop's delta; tokens without an adapter bitwise the launch without LoRA; two launches equal;
    the counters back at zero."""
    from kernels.moe import dense_gemm
    from tests.kernels.loop_reference import group_in_heap, group_to
    gen, cpu_gen = _gens(70 + t)
    for sections, n_in in (((4096, 512, 512), 2048), ((2048,), 4096)):
        ranks = [RANKS, RANKS[::-1], [0, 16, 8, 64, 1, 16]][:len(sections)]
        parts = [make_dense_lora(cpu_gen, len(RANKS), n_in, n, ranks[h], torch.bfloat16, "cpu")
                 for h, n in enumerate(sections)]
        group = group_to(group_in_heap(parts, sections), "cuda")
        x = torch.randn(t, n_in, generator=gen, device="cuda").to(torch.bfloat16)
        weight = (torch.randn(sum(sections), n_in, generator=gen, device="cuda") * n_in ** -0.5).to(torch.bfloat16)
        bias = torch.randn(sum(sections), generator=gen, device="cuda").to(torch.bfloat16)
        slots = make_slot_ids("uniform", t, len(RANKS), cpu_gen).cuda()
        slots[0] = 1
        if t > 1:
            slots[-1] = -1
        base64 = x.double() @ weight.double().T + bias.double()
        offs = [sum(sections[:h]) for h in range(len(sections) + 1)]
        parts = [type(q)(q.a.padded.cuda(), q.b.padded.cuda(), q.ranks.cuda()) for q in parts]
        want = torch.cat([dense_loop_ref(x, base64[:, offs[h]:offs[h + 1]], parts[h], slots)
                          for h in range(len(sections))], 1)
        _poison_allocator()
        got = dense_gemm.dense_lora_gemm(x, weight, bias, group, slots, None)
        again = dense_gemm.dense_lora_gemm(x, weight, bias, group, slots, None)
        alone = dense_gemm.dense_lora_gemm(x, weight, bias, None, None, None, sections=sections)
        torch.cuda.synchronize()
        assert rel_err(got, want) <= 1e-2
        if (slots >= 0).any():
            assert rel_err(got.double() - base64, want - base64) <= 2e-2
        assert torch.equal(got[slots < 0], alone[slots < 0])
        assert torch.equal(got, again)
        assert int(dense_gemm._sync(x.device).abs().sum()) == 0


@pytest.mark.parametrize("rows", ["rows-inplace", "rows"])
@pytest.mark.parametrize("t", [1, 8, 64])
def test_decode_step_captures_in_cuda_graph(t, rows, monkeypatch):
    """No host sync in the forward: alignment and all launches capture and replay, with either row
    path at decode size (launch.ROWS_AUTO, and ROWS_ONE_TOKEN at one token)."""
    from kernels.moe import launch
    monkeypatch.setattr(launch, "ROWS_AUTO", rows)
    monkeypatch.setattr(launch, "ROWS_ONE_TOKEN", rows)
    gen, cpu_gen = _gens(9)
    args = make_moe(gen, t, D, INTER, E, 8, torch.bfloat16, "cuda")
    lora = make_moe_lora(gen, len(RANKS), E, D, INTER, RANKS, torch.bfloat16, "cuda")
    slots = make_slot_ids("distinct", t, len(RANKS), cpu_gen).cuda()
    eager = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)

"""The down projection's LoRA at decode size, folded into the launches around the base down GEMM.

T = tokens, K = top-k, row r = t * K + k, s = slot_ids[t], e = topk_ids[t, k], r_s = ranks[s],
I = expert intermediate, D = hidden, R = the pool's largest rank.
    silu_mul_shrink:  act[r]  = silu(gate_up[r, :I]) * gate_up[r, I:]       (fp32, rounded once)
                      where the gate/up delta came by rank slices (lora_rows_'s into), gate_up[r]
                      is first gate_up[r] + sum_j delta[r, j] (fp32, rounded once to gate_up's dtype)
                      shrunk[r, :r_s] = act[r] @ A_down[s, e, :r_s].T        (fp32 sums of act's bf16)
    (base)            y[r]    = w[r] * act[r] @ W_down[e].T
    topk_sum:         out[t]  = sum_k y[t*K + k] + w[t*K + k] * shrunk[t*K + k].to(B) @ B_down[s, e_k, :, :r_s].T
                      (fp32, rounded once)

Why fold: at decode (64 tokens x top-8 over 16 adapters) the down delta is ~10 us of bytes, and
its own launch (a program per row: shrink, then expand into y) cost ~20 us on the H200, a chain of
dependent loads between two launches that exist anyway. The activation's program holds the whole
row of act, so the shrink there reads only A; the top-k sum reads every y row of a token, so the
expand there reads only B and writes nothing extra (no read-modify-write of y). Measured (H200,
benchmarks/RESULTS.md, kernels): 0.008-0.015 of the base ahead of the separate launch at M = 8-128
in the kernel bench; in the engine's decode step (48 layers, B from DRAM) ~0.09 ms of kernel time
a step, the top-k sum with the expand taking ~19 us where B's bytes need ~7.5. Rows without an
adapter take the same arithmetic as without LoRA: `silu_mul_shrink` computes act with
`silu_mul`'s expression and `topk_sum` sums y in the same order either way, so a token without an
adapter is bitwise equal to a run without LoRA (the base path sums with `topk_sum` too).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.errors import expect
from kernels.moe.lora_rows import RowPartials, row_slices
from kernels.moe.operands import factor_at
from kernels.pdl import pdl_args
from kernels.weights import Factor, as_factor


@triton.jit
def _silu_mul_shrink_kernel(x_ptr, out_ptr, shrunk_ptr, LA, P, ranks_ptr, slot_ids_ptr, topk_ids_ptr, top_k,
                            num_slots, num_experts, num_cols, big_r, stride_xm, stride_om,
                            BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, SLICE_R: tl.constexpr,
                            N_SLICES: tl.constexpr, PDL: tl.constexpr):
    # Straight-line code, masks instead of branches: the A tile's address needs three dependent
    # loads (slot, expert, the factor's offset), and a branch on the rank would keep the gate/up
    # loads from being in flight beside them. A row without an adapter has rank 0: its A loads
    # are all masked off (no memory traffic) and its shrink is 0. With PDL_READ_AHEAD (kernels/pdl.py)
    # that chain runs beside the launch ahead, which writes gate_up.
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ids_ptr + row // top_k).to(tl.int64)
    expert = tl.load(topk_ids_ptr + row).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < num_experts)
    slot = tl.where(live, slot, 0)
    expert = tl.where(live, expert, 0)
    slot_rank = tl.load(ranks_ptr + slot)
    rank = tl.where(live, tl.minimum(slot_rank, big_r), 0)
    pieces = 0
    if N_SLICES > 0:  # the gate/up delta's rank slices this row has (P: RowPartials, P[3] its pool's R)
        pieces = tl.cdiv(tl.where(live, tl.minimum(slot_rank, P[3]), 0), SLICE_R)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    la_base, la_rows = factor_at(LA, slot, expert, 0)
    la_base += offs_r[:, None] * la_rows
    if PDL == 2:
        tl.extra.cuda.gdc_wait()
    shrunk = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < num_cols
        # silu_mul's expression: gate is columns [0, I), up is columns [I, 2I) of the same row
        gate = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_xm + num_cols + offs, mask=mask, other=0.0).to(tl.float32)
        if N_SLICES > 0:  # gate_up + its delta, rounded once to gate_up's dtype, as stored in place
            d_gate = tl.zeros((BLOCK,), dtype=tl.float32)
            d_up = tl.zeros((BLOCK,), dtype=tl.float32)
            for j in tl.static_range(N_SLICES):
                here = mask & (tl.zeros((BLOCK,), dtype=tl.int32) + j < pieces)
                d_gate += tl.load(P[0] + row * P[1] + j * P[2] + offs, mask=here, other=0.0)
                d_up += tl.load(P[0] + row * P[1] + j * P[2] + num_cols + offs, mask=here, other=0.0)
            # a row without slices keeps gate_up as it is (bitwise: no + 0.0 turning -0.0 into 0.0)
            gate = tl.where(pieces > 0, (gate + d_gate).to(x_ptr.dtype.element_ty).to(tl.float32), gate)
            up = tl.where(pieces > 0, (up + d_up).to(x_ptr.dtype.element_ty).to(tl.float32), up)
        a = tl.load(la_base + offs[None, :] * LA[5], mask=r_ok[:, None] & mask[None, :], other=0.0)
        act = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_om + offs, act, mask=mask)
        # the down GEMM reads act as stored: the shrink does too
        shrunk += tl.sum(act.to(a.dtype).to(tl.float32)[None, :] * a.to(tl.float32), axis=1)
    tl.store(shrunk_ptr + row * BLOCK_R + offs_r, shrunk)


@triton.jit
def _topk_sum_kernel(y_ptr, out_ptr, shrunk_ptr, LB, scale_ptr, ranks_ptr, slot_ids_ptr, topk_ids_ptr,
                     num_slots, num_experts, d, big_r, stride_ym, stride_om, TOP_K: tl.constexpr,
                     TOP_K_P2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_LORA: tl.constexpr, PDL: tl.constexpr):
    # The top-k loops are unrolled and branch-free (a row's delta is selected, not branched to), so
    # every row's shrink and B loads are in flight at once: with a branch each row's chain (expert
    # id, factor offset, B) waited for the previous row's, ~8 DRAM latencies a program. The deltas
    # come first, the sum of y after: with PDL_READ_AHEAD (kernels/pdl.py) the deltas, which read
    # only what the launches before the down GEMM wrote, run beside that GEMM, which writes y.
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    if HAS_LORA:
        slot = tl.load(slot_ids_ptr + t).to(tl.int64)
        slot_live = (slot >= 0) & (slot < num_slots)
        slot = tl.where(slot_live, slot, 0)
        rank = tl.where(slot_live, tl.minimum(tl.load(ranks_ptr + slot), big_r), 0)
        offs_r = tl.arange(0, BLOCK_R)
        which = tl.arange(0, TOP_K_P2)[:, None]
        deltas = tl.zeros((TOP_K_P2, BLOCK_D), dtype=tl.float32)  # row k's delta in row k
        lives = tl.zeros((TOP_K_P2, 1), dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            row = t * TOP_K + k
            expert = tl.load(topk_ids_ptr + row).to(tl.int64)
            live = (rank > 0) & (expert >= 0) & (expert < num_experts)
            r_ok = offs_r < tl.where(live, rank, 0)
            # the shrink rounds to B's dtype, as the row and split paths' do
            s = tl.load(shrunk_ptr + row * BLOCK_R + offs_r, mask=r_ok, other=0.0)
            s = s.to(LB[0].dtype.element_ty).to(tl.float32)
            lb_base, lb_rows = factor_at(LB, slot, tl.where(live, expert, 0), 0)
            b = tl.load(lb_base + offs[:, None] * lb_rows + offs_r[None, :] * LB[5],
                        mask=mask[:, None] & r_ok[None, :], other=0.0)
            w = tl.load(scale_ptr + row).to(tl.float32)
            delta = tl.sum(b.to(tl.float32) * s[None, :], axis=1) * w
            deltas = tl.where(which == k, delta[None, :], deltas)
            lives = tl.where(which == k, live.to(tl.int32), lives)
    if PDL == 2:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        y = tl.load(y_ptr + (t * TOP_K + k) * stride_ym + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_LORA:
            # row k's delta (the other rows of the column add zeros)
            delta = tl.sum(tl.where(which == k, deltas, 0.0), axis=0)
            live = tl.sum(tl.where(which == k, lives, 0)) != 0
            # rows without a delta add y itself: the same arithmetic as without LoRA (bitwise)
            y = tl.where(live, y + delta, y)
        acc += y
    tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def rank_block(big_r: int) -> int:
    """The shrink buffer's width (and the kernels' rank tile) for a pool of largest rank big_r."""
    return max(16, triton.next_power_of_2(big_r))


def silu_mul_shrink(gate_up: Tensor, out: Tensor, shrunk: Tensor, la: "Factor | Tensor", ranks: Tensor,
                    slot_ids: Tensor, topk_ids: Tensor, *, block: int = 0, num_warps: int = 0,
                    pdl_early: bool = False, gate_up_delta: "RowPartials | None" = None) -> Tensor:
    """out = silu(gate_up[:, :I]) * gate_up[:, I:] as `silu_mul` computes it, and each routed row's
    down shrink from it; returns out. With gate_up_delta (the gate/up row launch's `into`), gate_up
    with each row's delta added, in fp32 and rounded once to gate_up's dtype, as that launch would
    have stored it in place; gate_up itself is not written.

    Semantics (see the module docstring): shrunk[r, :r_s] = out[r].float() @ la[s, e, :r_s].float().T
    summed in fp32; shrunk[r, r_s:] = 0, and all of row r zero where s or e is out of range.
    Args:
        gate_up: [T*K, 2I], unit column stride. out: [T*K, I], gate_up's dtype, unit column stride.
        shrunk: [T*K, rank_block(R)] fp32, contiguous, written in full.
        la: the down A Factor of logical shape [S, E, R, I] (or its padded stack), out's dtype.
        ranks: [S] int32. slot_ids: [T] int (-1: no adapter). topk_ids: [T, K] int.
        block, num_warps: the tile of a row's columns and the warps a program (0: SHRINK_TILE's and
            SHRINK_WARPS; sweeps pass others).
        pdl_early: the launch just before this one writes none of la, ranks, slot_ids and topk_ids
            (it writes gate_up: the gate/up LoRA): on a card with PDL the rows find their A tiles
            beside it (kernels/pdl.py).
        gate_up_delta: RowPartials of [T*K, n_slices, 2I] over the gate/up pool, whose ranks are
            `ranks` too (one MoELoRAWeights).
    """
    rows, two_i = gate_up.shape
    t, top_k = topk_ids.shape
    la_in, la = la, as_factor(la, la.shape[2])
    num_slots, num_experts, big_r, inter = la.shape
    br = rank_block(big_r)
    expect(two_i == 2 * inter and rows == t * top_k, f"gate_up must be [{t * top_k}, {2 * inter}], got {tuple(gate_up.shape)}")
    expect(tuple(out.shape) == (rows, inter), f"out must be [{rows}, {inter}], got {tuple(out.shape)}")
    expect(gate_up.stride(1) == 1 and out.stride(1) == 1, "silu_mul_shrink needs unit column strides")
    expect(tuple(shrunk.shape) == (rows, br) and shrunk.is_contiguous() and shrunk.dtype == torch.float32,
           f"shrunk must be a contiguous fp32 [{rows}, {br}]")
    expect(tuple(slot_ids.shape) == (t,) and tuple(ranks.shape) == (num_slots,), f"slot_ids must be [{t}], ranks [{num_slots}]")
    p, slice_r, n_slices = (shrunk, 0, 0, 0), 16, 0
    if gate_up_delta is not None:
        delta = gate_up_delta.buffer
        expect(delta.dim() == 3 and delta.shape[0] == rows and delta.shape[2] == two_i and delta.stride(2) == 1
               and delta.dtype == torch.float32, f"gate_up_delta must be an fp32 [{rows}, slices, {two_i}] with unit "
               f"column stride, got {tuple(delta.shape)} {delta.dtype}")
        slice_r, n_slices = gate_up_delta.slice_r, delta.shape[1]
        expect((slice_r, n_slices) == row_slices(gate_up_delta.big_r),
               f"gate_up_delta must hold row_slices({gate_up_delta.big_r}) = {row_slices(gate_up_delta.big_r)} "
               f"(ranks a slice, slices), got ({slice_r}, {n_slices})")
        p = (delta, delta.stride(0), delta.stride(1), gate_up_delta.big_r)
    if rows == 0:
        return out
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    # a copy of the ids, or a factor's offsets table made here, would be the launch ahead
    pdl_early = pdl_early and ids is topk_ids and la is la_in
    block = block or min(1024, triton.next_power_of_2(inter), max(16, SHRINK_TILE // br))
    _silu_mul_shrink_kernel[(rows,)](
        gate_up, out, shrunk, la.operand(), p, ranks, slot_ids, ids, top_k, num_slots, num_experts, inter, big_r,
        gate_up.stride(0), out.stride(0), BLOCK=block, BLOCK_R=br, SLICE_R=slice_r, N_SLICES=n_slices,
        num_warps=num_warps or SHRINK_WARPS, **pdl_args(gate_up.device, pdl_early))
    return out


# Tiles (elements) of the A tile in silu_mul_shrink and of a row's B tile in topk_sum: those measured
# at rank 16 (16 x 1024 and 128 x 16, benchmarks/RESULTS.md); a wider pool's rank block narrows the
# other side, so that a rank-64 pool does not hold 4x the registers a thread (and spill).
SHRINK_TILE = 16 * 1024
SHRINK_WARPS = 4
TOPK_SUM_BLOCK_D = 128
TOPK_SUM_TILE = 128 * 16
TOPK_SUM_WARPS = 4


def topk_sum(y: Tensor, out: Tensor, top_k: int, lora: "tuple[Factor | Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None" = None,
             *, block_d: int = 0, num_warps: int = 0, pdl_early: bool = False) -> Tensor:
    """out[t] = sum over k of y[t*K + k] in fp32, rounded once; with lora = (lb, ranks, shrunk,
    scale, slot_ids, topk_ids), each row's down expand added first (module docstring). Returns out.

    Args:
        y: [T*K, D], unit column stride. out: [T, D], unit column stride, written in full.
        lb: the down B Factor of logical shape [S, E, D, R]; ranks [S] int32; shrunk: silu_mul_shrink's
        [T*K, rank_block(R)] fp32; scale: [T*K] float (routing weights); slot_ids [T]; topk_ids [T, K].
        block_d, num_warps: the columns and warps a program with lora (0: TOPK_SUM_TILE's and
            TOPK_SUM_WARPS; sweeps pass others). Without lora the sum keeps TOPK_SUM_BLOCK_D.
        pdl_early: with lora, the launch just before this one writes none of lora's tensors (it
            writes y: the base down GEMM): on a card with PDL the deltas run beside it (kernels/pdl.py).
    """
    rows, d = y.shape
    t = out.shape[0]
    expect(rows == t * top_k and tuple(out.shape) == (t, d), f"y must be [T*K, D] and out [T, D], got {tuple(y.shape)}, {tuple(out.shape)}")
    expect(y.stride(1) == 1 and out.stride(1) == 1, "topk_sum needs unit column strides")
    if t == 0 or d == 0:
        return out
    grid = (t, triton.cdiv(d, TOPK_SUM_BLOCK_D))
    if lora is None:
        _topk_sum_kernel[grid](y, out, y, None, y, y, y, y, 0, 0, d, 0, y.stride(0), out.stride(0), TOP_K=top_k,
                               TOP_K_P2=triton.next_power_of_2(top_k), BLOCK_D=TOPK_SUM_BLOCK_D, BLOCK_R=16,
                               HAS_LORA=False, PDL=0, num_warps=4)
        return out
    lb_in, ranks, shrunk, scale, slot_ids, topk_ids = lora
    lb = as_factor(lb_in, lb_in.shape[2])
    num_slots, num_experts, _, big_r = lb.shape
    br = rank_block(big_r)
    expect(tuple(lb.shape[2:]) == (d, big_r), f"lb must be [S, E, {d}, R], got {tuple(lb.shape)}")
    expect(tuple(shrunk.shape) == (rows, br) and shrunk.is_contiguous() and shrunk.dtype == torch.float32,
           f"shrunk must be a contiguous fp32 [{rows}, {br}]")
    expect(tuple(scale.shape) == (rows,) and tuple(slot_ids.shape) == (t,), f"scale must be [{rows}], slot_ids [{t}]")
    expect(tuple(topk_ids.shape) == (t, top_k) and tuple(ranks.shape) == (num_slots,),
           f"topk_ids must be [{t}, {top_k}] and ranks [{num_slots}]")
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    pdl_early = pdl_early and ids is topk_ids and lb is lb_in  # nothing launched here ahead of it
    block_d = block_d or min(TOPK_SUM_BLOCK_D, max(16, TOPK_SUM_TILE // br))
    grid = (t, triton.cdiv(d, block_d))
    _topk_sum_kernel[grid](y, out, shrunk, lb.operand(), scale, ranks, slot_ids, ids, num_slots, num_experts,
                           d, big_r, y.stride(0), out.stride(0), TOP_K=top_k, TOP_K_P2=triton.next_power_of_2(top_k),
                           BLOCK_D=block_d, BLOCK_R=br, HAS_LORA=True, num_warps=num_warps or TOPK_SUM_WARPS,
                           **pdl_args(y.device, pdl_early))
    return out

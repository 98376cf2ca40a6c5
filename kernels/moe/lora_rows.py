"""LoRA delta at decode size: a program per row, shrink then expand, in one launch.

MoE projection: for each routed row r = t * K + k with slot s = slot_ids[t] >= 0, expert
e = topk_ids[t, k] and rank r_s = ranks[s], for each split h (gate/up halves: splits = 2; one
otherwise):
    shrunk    = a[r // a_row_div, :] @ A[s, e, h*R:h*R + r_s, :].T          (fp32 sums)
    c[r, h*N:(h+1)*N] (+)= scale[r] * shrunk.to(B.dtype) @ B[s, e, h*N:(h+1)*N, :r_s].T
rounded once to c's dtype, the split path's order of operations (lora_shrink, then
lora_expand_tiles): only the summation order differs.

Dense projections sharing an input (q/k/v as one group, or o alone): the same with one expert,
a row per token and split h = projection h, whose columns [off_h, off_h + N_h) may differ in
width and whose rank is ranks[h, s].

Why a program per row and not per (slot, expert) block: at decode (64 tokens x top-8 over 16
adapters) ~456 pairs hold ~1.1 of their 16-row tile each, so the split path pays an alignment,
two launches per projection and an fp32 intermediate for tiles that are mostly padding. A row
needs no alignment (its pair is read from the routing ids), its shrink stays in registers for
the expand, and the products are vector x matrix: bandwidth, not tensor cores. Rows of one pair
read its A and B once each (about 12% more adapter bytes than the pairs at decode, mostly served
by L2, since those rows run at the same time). Above decode size rows share pairs more and the
block path's one read per pair wins. Dense rows of one slot share everything but x, so the
repeated reads are all L2 hits; what the row path removes there is the dense path's second
launch, its alignment and its fp32 partial sums (four dependent launches a layer at decode).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.errors import expect
from kernels.moe.operands import factor_at
from kernels.pdl import pdl_args
from kernels.weights import DenseLoRAGroup, Factor, as_factor


# Operands are tuples: A = (ptr, row stride, column stride); LA, LB = LoRA factors
# (kernels.weights.Factor.operand); C = (ptr, row stride, column stride); ends = the splits' last
# columns + 1.
@triton.jit  # the token count is the grid, not an argument: one compile for every count
def _lora_rows_kernel(A, LA, LB, C, P, scale_ptr, ranks_ptr, slot_ids_ptr, topk_ids_ptr, top_k, a_row_div,
                      num_slots, num_experts, K, R, ends, rank_split_stride, n_chunk, BLOCK_R: tl.constexpr,
                      BK16: tl.constexpr, BN16: tl.constexpr, BK32: tl.constexpr, BN32: tl.constexpr,
                      BK64: tl.constexpr, BN64: tl.constexpr, BKR: tl.constexpr, BNR: tl.constexpr,
                      BUCKETS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXPERTS: tl.constexpr,
                      SLICE_R: tl.constexpr, N_SLICES: tl.constexpr, BKS: tl.constexpr, BNS: tl.constexpr,
                      PDL: tl.constexpr):
    if PDL != 0:  # the activation's launch may start once every row here has (kernels/pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
    if PDL == 1:  # PDL_WAIT_FIRST; PDL_READ_AHEAD waits between a row's shrink and its expand
        tl.extra.cuda.gdc_wait()  # into c, and into P (N_SLICES > 0) only before the program ends
    row = tl.program_id(0)
    if N_SLICES > 0:  # into P: axis 1 is (split, rank slice)
        split = tl.program_id(1) // N_SLICES
        piece = tl.program_id(1) % N_SLICES
    else:
        split = tl.program_id(1)
        piece = 0
    part = tl.program_id(2)
    slot = tl.load(slot_ids_ptr + row // top_k).to(tl.int64)
    if HAS_EXPERTS:
        expert = tl.load(topk_ids_ptr + row).to(tl.int64)
    else:
        expert = tl.full((), 0, tl.int64)
    # split h owns the columns [end_{h-1}, end_h) of c and the same rows of B (end_{-1} = 0)
    n_begin = tl.where(split == 0, 0, tl.where(split == 1, ends[0], ends[1]))
    n_stop = tl.where(split == 0, ends[0], tl.where(split == 1, ends[1], ends[2]))
    col0 = n_begin + part * n_chunk
    # rows without an adapter, or with ids out of range, are left alone (bitwise)
    live = (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < num_experts)
    slot = tl.where(live, slot, 0)
    expert = tl.where(live, expert, 0)
    rank = tl.where(live, tl.minimum(tl.load(ranks_ptr + split * rank_split_stride + slot), R), 0)
    if N_SLICES > 0:
        if (rank > piece * SLICE_R) & (col0 < n_stop):
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, piece, a_row_div, K, col0,
                       tl.minimum(n_stop, col0 + n_chunk), SLICE_R, BKS, BNS, HAS_SCALE, PDL, True)
    elif (rank > 0) & (col0 < n_stop):
        n_end = tl.minimum(n_stop, col0 + n_chunk)
        # the row's rank picks its tile width (rank buckets 16 / 32 / 64 / BLOCK_R; the launch
        # sizes each bucket's K and N tiles): a rank-16 row of a rank-64 pool runs 16 rows wide
        if (BLOCK_R == 16) or (not BUCKETS):  # one tile for every row (BUCKETS off: A/B runs)
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       BLOCK_R, BKR, BNR, HAS_SCALE, PDL, False)
        elif rank <= 16:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       16, BK16, BN16, HAS_SCALE, PDL, False)
        elif BLOCK_R == 32:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       32, BK32, BN32, HAS_SCALE, PDL, False)
        elif rank <= 32:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       32, BK32, BN32, HAS_SCALE, PDL, False)
        elif BLOCK_R == 64:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       64, BK64, BN64, HAS_SCALE, PDL, False)
        elif rank <= 64:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       64, BK64, BN64, HAS_SCALE, PDL, False)
        else:
            _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, 0, a_row_div, K, col0, n_end,
                       BLOCK_R, BKR, BNR, HAS_SCALE, PDL, False)
    if PDL != 0:  # every program, rows with an adapter or not: this launch ends after the one ahead
        tl.extra.cuda.gdc_wait()


@triton.jit
def _row_delta(A, LA, LB, C, P, scale_ptr, row, split, slot, expert, rank, piece, a_row_div, K, col0, n_end,
               BR: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, HAS_SCALE: tl.constexpr,
               PDL: tl.constexpr, PARTIAL: tl.constexpr):
    """c[row, col0:n_end] += (scale *) B[:, :rank] @ (A[:rank] @ a[row // a_row_div]) of split h;
    PARTIAL: p[row, piece, col0:n_end] = the same over ranks [piece * BR, (piece + 1) * BR), fp32."""
    offs_r = piece * BR + tl.arange(0, BR)
    r_ok = offs_r < rank
    # shrink: A rows [h*R, h*R + r_s) of the pair against the row's input, K tile by K tile
    a_row = A[0] + (row // a_row_div) * A[1]
    la_base, la_rows = factor_at(LA, slot, expert, split)
    la_base += offs_r[:, None] * la_rows
    shrunk = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(a_row + offs_k * A[2], mask=k_ok, other=0.0)
        w = tl.load(la_base + offs_k[None, :] * LA[5], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        shrunk += tl.sum(x.to(w.dtype).to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    # PDL_READ_AHEAD: c is the launch ahead's output; P is no launch's still running (lora_rows_'s into)
    if (PDL == 2) and (not PARTIAL):
        tl.extra.cuda.gdc_wait()
    # expand: this part's columns of split h; the shrink rounds to B's dtype as the split path's does
    s = shrunk.to(LB[0].dtype.element_ty).to(tl.float32)
    lb_base, lb_rows = factor_at(LB, slot, expert, 0)  # B rows are c's columns
    lb_base += offs_r[None, :] * LB[5]
    c_row = C[0] + row * C[1]
    row_scale = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        row_scale = tl.load(scale_ptr + row).to(tl.float32)
    for n0 in range(col0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < n_end
        b = tl.load(lb_base + offs_n[:, None] * lb_rows, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        delta = tl.sum(b.to(tl.float32) * s[None, :], axis=1)
        if HAS_SCALE:
            delta = delta * row_scale
        if PARTIAL:
            tl.store(P[0] + row * P[1] + piece * P[2] + offs_n, delta, mask=n_ok)
        else:
            prior = tl.load(c_row + offs_n * C[2], mask=n_ok, other=0.0).to(tl.float32)
            tl.store(c_row + offs_n * C[2], (delta + prior).to(C[0].dtype.element_ty), mask=n_ok)


def lora_rows_(a: Tensor, c: Tensor, la: "Factor | Tensor", lb: "Factor | Tensor", ranks: Tensor, slot_ids: Tensor,
               topk_ids: Tensor, *, a_row_div: int, splits: int = 1, scale: Tensor | None = None,
               parts: int = 1, block_k: int = 128, block_n: int = 128, num_warps: int = 4,
               num_stages: int = 3, tile_r: int = 0, buckets: bool = True, pdl_early: bool = False,
               into: "RowPartials | None" = None) -> Tensor:
    """Adds each routed row's LoRA delta of one MoE projection into c in place; returns c. With
    `into`, writes the deltas there by rank slice instead and leaves c alone (RowPartials).

    Semantics (T tokens, K = top-k, row r = t*K + k, s = slot_ids[t], e = topk_ids[t, k],
    R = la.shape[2] // splits, N = lb.shape[2] // splits, r_s = min(ranks[s], R)):
        for each row with 0 <= s < S, 0 <= e < E and r_s > 0, and each split h < splits:
            c[r, h*N:(h+1)*N] = (scale[r] *) ((a[r // a_row_div] @ la[s, e, h*R:h*R + r_s].T)
                                 .to(lb.dtype) @ lb[s, e, h*N:(h+1)*N, :r_s].T).float()
                                 + c[r, h*N:(h+1)*N], rounded once to c.dtype.
        Other rows are never touched (bitwise); A rows and B columns >= r_s are never read. No
        host sync: CUDA-graph capturable.
    Args:
        a: [A_rows, K_in] fp32/fp16/bf16 (hidden with a_row_div = top-k, or act with 1); any strides.
        c: [T*K, splits*N], a's dtype; any strides.
        la, lb: Factors of logical shapes [S, E, splits*R, K_in] and [S, E, splits*N, R] (split h
            from row h*R / h*N), or those padded stacks; a's dtype, scaling folded into lb.
        ranks: [S] int32. slot_ids: [T] int (-1: no adapter). topk_ids: [T, K] int32/int64.
        scale: [T*K] float per-row factor (routing weight) or None.
        parts: programs that split a row's N columns (each repeats the shrink: more programs
            in flight where a row's expand is long).
        block_k, block_n, num_warps, num_stages: tile config; block_k and block_n are the tiles of
            rows of rank tile_r (0: the pool's R rounded up to a power of two); a row's rank bucket
            (16, 32, 64 or R) scales them by tile_r / bucket (bucket_tiles); buckets=False runs
            every row at R's tile (the kernel before buckets, for A/B runs).
        pdl_early: the launch just before this one writes none of a, la, lb, ranks, slot_ids, topk_ids
            and scale (the base GEMM into c, typically): on a card with PDL the rows' shrinks then run
            beside it (kernels/pdl.py). With `into` the expands too, which write into.buffer before
            the wait: the caller also says that the launch ahead touches nothing of into.buffer and
            is no PDL launch itself (so no launch before it still runs: the base GEMM is neither).
        into: RowPartials of [T*K, n_slices, splits*N] for this projection's pool (row_partials):
            into.buffer[r, j, h*N:(h+1)*N] = the delta of ranks [j * slice_r, (j + 1) * slice_r)
            (scaled, fp32, not rounded) for j < cdiv(r_s, slice_r); nothing else is written.
    """
    expect(splits in (1, 2), f"splits must be 1 or 2, got {splits}")
    expect(len(la.shape) == 4 and len(lb.shape) == 4, f"la and lb must be 4-D, got {tuple(la.shape)} and {tuple(lb.shape)}")
    num_slots, num_experts, r_total, k_in = la.shape
    expect(r_total % splits == 0 and lb.shape[2] % splits == 0, f"la and lb rows must split in {splits}")
    given = (la, lb)
    la, lb = as_factor(la, r_total // splits), as_factor(lb, lb.shape[2] // splits)
    big_r, n = r_total // splits, lb.shape[2] // splits
    expect(tuple(lb.shape) == (num_slots, num_experts, splits * n, big_r),
           f"lb must be [{num_slots}, {num_experts}, {splits}*N, {big_r}], got {tuple(lb.shape)}")
    t, top_k = topk_ids.shape
    rows = t * top_k
    expect(a.dim() == 2 and a.shape[1] == k_in and a.shape[0] * a_row_div >= rows,
           f"a must be [>= {rows // a_row_div}, {k_in}], got {tuple(a.shape)}")
    expect(tuple(c.shape) == (rows, splits * n), f"c must be [{rows}, {splits * n}], got {tuple(c.shape)}")
    expect(tuple(slot_ids.shape) == (t,) and tuple(ranks.shape) == (num_slots,),
           f"slot_ids must be [{t}] and ranks [{num_slots}]")
    expect(scale is None or tuple(scale.shape) == (rows,), f"scale must be [{rows}]")
    expect(parts >= 1, f"parts must be positive, got {parts}")
    if into is not None:
        want = (rows, row_slices(big_r)[1], splits * n)
        expect(into.big_r == big_r and into.slice_r == row_slices(big_r)[0] and tuple(into.buffer.shape) == want
               and into.buffer.dtype == torch.float32 and into.buffer.stride(2) == 1,
               f"into must be row_partials({rows}, {splits * n}, {big_r}): an fp32 {list(want)} with unit column "
               f"stride, got {tuple(into.buffer.shape)} {into.buffer.dtype} of R = {into.big_r}")
    if rows == 0 or n == 0:
        return c
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    # a copy of the ids, or a factor's offsets table made here, would be the launch ahead
    pdl_early = pdl_early and ids is topk_ids and la is given[0] and lb is given[1]
    _launch(a, c, la, lb, ranks, 0, slot_ids, ids, top_k, a_row_div, rows, [n * (h + 1) for h in range(splits)],
            big_r, scale, parts, block_k, block_n, num_warps, num_stages, tile_r, buckets, pdl_early, into)
    return c


# A row's delta in at most this many rank slices (RowPartials): each slice a program of the rank-16
# bucket's chain, where a rank-64 row's one program walked its K and N in 4x as many steps.
MAX_ROW_SLICES = 4


def row_slices(big_r: int) -> tuple[int, int]:
    """(ranks a slice, slices a row) of RowPartials for a pool of largest rank big_r: slices of 16
    ranks, at most MAX_ROW_SLICES of them (wider slices past rank 64)."""
    block_r = max(16, triton.next_power_of_2(big_r))
    slice_r = max(16, block_r // MAX_ROW_SLICES)
    return slice_r, block_r // slice_r


class RowPartials(NamedTuple):
    """Each routed row's LoRA delta of a projection in rank slices, for the launch after the row
    launch to add as it reads the projection's output (silu_mul_shrink does for gate/up).

    Why: added into c in place, a row's expand reads c, so with PDL it waits for the base GEMM
    that writes c, and a rank-64 row is one program's chain of 4x a rank-16 row's steps (K and N
    tiles of the rank-16 bucket's bytes each). Written here, the whole row launch runs beside the
    base GEMM, a row's ranks split over programs of rank-16 chains, and the launch after, which reads
    c anyway, adds a row's slices with loads beside c's.

    buffer: [rows, n_slices, columns] fp32: slice j of a row of rank r_s holds the delta of ranks
    [j * slice_r, (j + 1) * slice_r) for j < cdiv(min(r_s, big_r), slice_r); no other element is
    written, nor read by the launch after (no zeroing). big_r: the pool's largest rank."""
    buffer: Tensor
    slice_r: int
    big_r: int


def row_partials(rows: int, columns: int, big_r: int, device: torch.device) -> RowPartials:
    """An unwritten RowPartials for `rows` routed rows of `columns` columns over a pool of largest
    rank big_r."""
    slice_r, n_slices = row_slices(big_r)
    return RowPartials(torch.empty(rows, n_slices, columns, dtype=torch.float32, device=device), slice_r, big_r)


def lora_group_rows_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, slot_ids: Tensor, *, parts: int = 1,
                     block_k: int = 128, block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
                     tile_r: int = 0, buckets: bool = True, pdl_early: bool = False) -> Tensor:
    """Adds each token's LoRA deltas of the group's projections (q/k/v, or o alone) into out in
    place, a program per (token, projection, part of its columns); returns out.

    Semantics: lora_group_ref_'s (kernels/reference.py): out[t, off_h:off_h + N_h] +=
        (x[t] @ a_h[s].T).to(b.dtype) @ b_h[s].T with s = slot_ids[t] and a_h's first ranks[h, s]
        rows, rounded once to out.dtype; tokens with s outside [0, S) and projections of rank 0
        untouched (bitwise). No alignment, no host sync: CUDA-graph capturable.
    Args:
        x: [T, IN]; out: [T, N], N = sum(lora.sections); x's dtype; any strides.
        lora: DenseLoRAGroup of at most MAX_GROUP_ROWS_PROJECTIONS projections.
        slot_ids: [T] int, -1 for no adapter.
        parts: programs that split the widest projection's columns (each repeats the shrink);
        block_k, block_n, num_warps, num_stages, tile_r, buckets: tile config, as lora_rows_'s.
        pdl_early: as lora_rows_'s (x, the group's factors and slot_ids not written by the launch
            just before).
    """
    heads = lora.num_projections
    expect(heads <= MAX_GROUP_ROWS_PROJECTIONS,
           f"the row path takes at most {MAX_GROUP_ROWS_PROJECTIONS} projections, got {heads}")
    expect(parts >= 1, f"parts must be positive, got {parts}")
    t = x.shape[0]
    if t == 0:
        return out
    ends = [lora.offset(h + 1) for h in range(heads)]
    _launch(x, out, lora.a, lora.b, lora.ranks, lora.ranks.stride(0), slot_ids, None,
            1, 1, t, ends, lora.max_rank, None, parts, block_k, block_n, num_warps, num_stages, tile_r, buckets,
            pdl_early)
    return out


# q/k/v: split h's column range is picked from three ends in the kernel
MAX_GROUP_ROWS_PROJECTIONS = 3


def bucket_tiles(block_r: int, block_k: int, block_n: int, tile_r: int, k_in: int, n_chunk: int) -> dict[int, tuple[int, int]]:
    """{rank bucket: (K tile, N tile)} of the row kernel for a pool of rank block_r (a power of two):
    buckets 16, 32, 64 up to block_r, and block_r itself. A bucket br takes block_k x tile_r / br and
    block_n x tile_r / br (0 < tile_r <= block_r: the rank at which the given tiles hold; 0 or
    more than block_r: block_r), within 16 and the operand's width rounded up to a power of two.
    With tile_r = block_r each bucket's A tile holds as many elements as the widest's: a low-rank
    row walks K in fewer, longer steps (a row's shrink is a chain of dependent loads, so steps
    cost more than bytes here)."""
    return {br: bucket_tile(br, block_r, block_k, block_n, tile_r, k_in, n_chunk)
            for br in sorted({min(b, block_r) for b in (16, 32, 64)} | {block_r})}


def bucket_tile(br: int, block_r: int, block_k: int, block_n: int, tile_r: int, k_in: int, n_chunk: int) -> tuple[int, int]:
    """bucket_tiles' (K tile, N tile) of the bucket br (a power of two up to block_r)."""
    tile_r = min(tile_r or block_r, block_r)
    k_cap, n_cap = max(16, triton.next_power_of_2(k_in)), max(16, triton.next_power_of_2(n_chunk))
    return min(k_cap, max(16, block_k * tile_r // br)), min(n_cap, max(16, block_n * tile_r // br))


def _launch(a: Tensor, c: Tensor, la: Factor, lb: Factor, ranks: Tensor, rank_split_stride: int,
            slot_ids: Tensor, topk_ids: Tensor | None, top_k: int, a_row_div: int, rows: int, ends: list[int],
            big_r: int, scale: Tensor | None, parts: int, block_k: int, block_n: int, num_warps: int,
            num_stages: int, tile_r: int, buckets: bool, pdl_early: bool, partials: "RowPartials | None" = None) -> None:
    """One launch of _lora_rows_kernel: rows x splits (x rank slices, into partials) x parts
    programs; ends: each split's last column + 1 (increasing), the widest split's columns cut in
    `parts` whole N tiles."""
    expect(tile_r >= 0, f"tile_r must be >= 0, got {tile_r}")
    widest = max(end - begin for begin, end in zip([0, *ends[:-1]], ends))
    n_chunk = triton.cdiv(triton.cdiv(widest, parts), block_n) * block_n
    padded = tuple((ends + [ends[-1]] * 3)[:3])
    block_r = max(16, triton.next_power_of_2(big_r))
    tiles = bucket_tiles(block_r, block_k, block_n, tile_r, la.shape[3], n_chunk)
    pick = lambda br: tiles[min(br, block_r)]  # noqa: E731  (buckets over block_r are never taken)
    n_slices, slice_r, slice_tiles, p = 0, 16, pick(16), (c, 0, 0)  # the slice constexprs unused without partials
    if partials is not None:
        n_slices, slice_r = partials.buffer.shape[1], partials.slice_r
        slice_tiles = bucket_tile(slice_r, block_r, block_k, block_n, tile_r, la.shape[3], n_chunk)
        p = (partials.buffer, partials.buffer.stride(0), partials.buffer.stride(1))
    _lora_rows_kernel[(rows, len(ends) * max(1, n_slices), triton.cdiv(widest, n_chunk))](
        (a, a.stride(0), a.stride(1)), la.operand(), lb.operand(), (c, c.stride(0), c.stride(1)), p,
        scale if scale is not None else ranks, ranks, slot_ids, topk_ids if topk_ids is not None else slot_ids,
        top_k, a_row_div, la.shape[0], la.shape[1], la.shape[3], big_r, padded, rank_split_stride, n_chunk,
        BLOCK_R=block_r, BK16=pick(16)[0], BN16=pick(16)[1], BK32=pick(32)[0], BN32=pick(32)[1],
        BK64=pick(64)[0], BN64=pick(64)[1], BKR=tiles[block_r][0], BNR=tiles[block_r][1], BUCKETS=buckets,
        HAS_SCALE=scale is not None, HAS_EXPERTS=topk_ids is not None, SLICE_R=slice_r, N_SLICES=n_slices,
        BKS=slice_tiles[0], BNS=slice_tiles[1], num_warps=num_warps, num_stages=num_stages,
        **pdl_args(a.device, pdl_early),
    )


def lora_rows_ref_(a: Tensor, c: Tensor, la: "Factor | Tensor", lb: "Factor | Tensor", ranks: Tensor, slot_ids: Tensor,
                   topk_ids: Tensor, *, a_row_div: int, splits: int = 1, scale: Tensor | None = None,
                   **tiles: object) -> Tensor:
    """Torch twin of lora_rows_ (same Semantics and Args; the tile arguments are ignored).
    Walks the rows on the host, so it syncs: for tests, not for graphs."""
    num_slots, num_experts = la.shape[:2]
    big_r, n = la.shape[2] // splits, lb.shape[2] // splits
    la, lb = as_factor(la, big_r), as_factor(lb, n)
    top_k = topk_ids.shape[1]
    for row, e in enumerate(topk_ids.reshape(-1).tolist()):
        s = int(slot_ids[row // top_k])
        if not (0 <= s < num_slots and 0 <= e < num_experts):
            continue
        r = min(int(ranks[s]), big_r)
        for h in range(splits if r > 0 else 0):
            x = a[row // a_row_div].to(la.dtype).float()
            shrunk = (la.view(s, h, r, la.shape[3])[e].float() @ x).to(lb.dtype).float()  # [r]
            delta = lb.view(s, h, n, r)[e].float() @ shrunk  # [N]
            if scale is not None:
                delta = delta * scale[row].float()
            c[row, h * n:(h + 1) * n] = (delta + c[row, h * n:(h + 1) * n].float()).to(c.dtype)
    return c

"""A dense projection group's base GEMM and every token's LoRA delta in one launch, at decode size.

    out[t] = x[t] @ W.T (+ bias) + sum_h (x[t] @ A_h[s].T) @ B_h[s].T     (s = slot_ids[t] >= 0)

with projection h's delta in its own columns (q/k/v as one group, or o alone; kernels.weights.
DenseLoRAGroup), rounded once to out's dtype.

Why: at decode (<= 64 tokens) a dense group's LoRA costs two launches behind the base GEMM (a
shrink split over K, then an expand) for a few us of adapter bytes: four dependent launches an
attention layer, 5-8x their bytes on the H100 and H200 (benchmarks/RESULTS.md). Here the shrink
runs beside the base GEMM in the same grid and the expand is added to each output tile before
its one store.

Programs of one grid:
- The first `num_shrink` programs to start (by ticket, below) run the shrink: (chunk of blocks of
  the step's dense layout, projection, K slice) tiles into fp32 partial sums part[slice, t, h*R + j].
  Each then counts itself in sync[0].
- Every other program owns the base tile (N tile n, K slice k) of x @ W.T. After its K loop it
  waits until sync[0] says every shrink program is done and adds the deltas of the chunks k,
  k + slices, ... to the rows of their tokens (the slices share the chunks out; a token without
  an adapter is in no block, so its row keeps the base sum's bits). With one K slice it
  then stores the tile; with several, it stores its fp32 partial in a workspace and counts itself
  in its tile's counter, and the one that arrives last sums the tile's partials in slice order
  (the sum does not depend on which program came last: runs are bitwise repeatable, and a row
  without an adapter equals the launch without LoRA), adds the bias and stores the tile.
- A chunk is CHUNK / BLOCK_R consecutive layout blocks, taken as one block-diagonal operand of
  CHUNK columns (block i's slot, rank index j): the shrink is one dot of all the tokens' x against
  the chunk's slots' A rows side by side, each token keeping its own slot's columns; the delta is
  one dot of the tokens' shrinks, each placed in its slot's columns, against the chunk's B tiles
  stacked along K. A walk over the blocks one at a time is a chain of dependent loads a block
  (slot, then its rank and factors; ~1.5-2 us each on the H100), and a decode step has ~16-20.
- Waiting is safe: a program takes its role from a ticket (sync[2], counted up as programs start)
  rather than from its program id, and the first `num_shrink` tickets are the shrink's, so every
  shrink program has started before any program that waits for it (CUDA does not promise to
  place a grid's programs in id order).
Counters are zero between launches: a tile's last program zeroes its tile's, the last program
to pass the wait zeroes sync[0], sync[1] and sync[2]. One buffer serves all launches on a
device, so launches on a device must run one after another (one stream; the engine's forward
runs on one).

Why a split of K for the base: o's W at 64 tokens is [2048, 4096]; 64-column tiles alone give 32
programs, too few to stream 16 MB at the copy rate, and narrower tiles would read x once per
tile from L2 (x is 512 KB there). Slices of K bring the grid to about one program per SM.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.errors import expect
from kernels.moe.align import VirtualLayout
from kernels.moe.grouped_gemm import _dot
from kernels.moe.operands import factor_at, k_slices
from kernels.pdl import pdl_args
from kernels.weights import DenseLoRAGroup

# Token counts the fused launch takes (the whole batch is one M tile of at most this many rows).
# Off unless MOEPLEX_DENSE_FUSED=1 (or ENABLED = True): on the H100 (2026-12-06, benchmarks/RESULTS.md,
# "The dense groups' base GEMM and LoRA in one launch"; 5d11e2c) it loses to cuBLAS plus the split
# path from 32 tokens on (q/k/v + o at 64 tokens, 16 adapters: 50.0 us against 40.1) and its base
# alone to cuBLAS at every size (25.7 against 19.9 us at 64 tokens); the engine's decode steps took
# 19.94 against 19.79 ms (c_16) and 17.69 against 17.40 (a_none, which takes the launch too).
FUSED_MAX_TOKENS = 64
ENABLED = os.environ.get("MOEPLEX_DENSE_FUSED", "0") == "1"
# The base tile and its K tiles (BLOCK_K deep, NUM_STAGES in flight) at 4 warps; lora_k: a chunk's
# columns (64: four rank-16 blocks); shrink_k: the shrink's K tile, its K slices group_k_splits'.
# sm_90 at 64 tokens (triton 3.6, compiled here as benchmarks/compare_sass.py does; 5d11e2c):
# lora_k 128 takes 255 registers and spills, 64 takes 241; shrink_k 128 takes 144 KB of shared
# memory (one program an SM), 64 keeps the base loop's 96 KB (two).
FUSED_TILES = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "lora_k": 64, "shrink_k": 64}
SHRINK_PROGRAMS = 128  # at most; each walks (chunk of blocks, projection, K slice) tiles
MAX_TILES = 8192  # N tiles a launch may have: the per-device counter buffer's size
_LAUNCH_COUNTERS = 3  # sync[0] shrink programs done, sync[1] base programs past the wait, sync[2] tickets
_SYNC: dict[str, Tensor] = {}


@triton.jit
def _chunk_columns(lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, CHUNK: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Layout blocks chunk * CHUNK / BLOCK_R ... as the K columns of a block-diagonal operand,
    column kk = (block i, rank index j): per column the block's slot (-1 past the blocks in use
    and for every block of a slot but its first, which takes all the slot's tokens), j, and
    whether j is under that slot's rank of projection h."""
    offs_kk = tl.arange(0, CHUNK)
    blk = chunk * (CHUNK // BLOCK_R) + offs_kk // BLOCK_R
    j = offs_kk % BLOCK_R
    # the slots load bounded by the host's max_blocks, so that they need not wait for the device's
    # block count (past which block_slot holds -1); the count masks as well, off their path
    in_lay = blk < max_blocks
    slot = tl.load(lay[2] + blk, mask=in_lay, other=-1)
    # a dense layout orders blocks by slot: a slot's later blocks follow its first
    prev = tl.load(lay[2] + blk - 1, mask=in_lay & (blk > 0), other=-1)
    slot = tl.where((slot != prev) & (blk < tl.load(lay[3])), slot, -1).to(tl.int64)
    rank = tl.load(ranks_ptr + h * rank_split_stride + slot, mask=slot >= 0, other=0)
    return slot, j, (slot >= 0) & (j < tl.minimum(rank, R))


@triton.jit
def _one_per_token(v, slot_t, slot_k, k_ok, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr):
    """From [BLOCK_T, CHUNK] block-diagonal columns, each token's own slot's BLOCK_R columns
    (zeros for a token whose slot is not in the chunk), and which tokens' slots are."""
    mine = (slot_t[:, None] == slot_k[None, :]) & k_ok[None, :]
    v = tl.reshape(tl.where(mine, v, 0.0), (BLOCK_T, CHUNK // BLOCK_R, BLOCK_R))
    return tl.sum(v, axis=1), tl.max(mine.to(tl.int32), axis=1) > 0


@triton.jit
def _shrink_tiles(X, LA, P, lay, max_blocks, slot_ids_ptr, ranks_ptr, rank_split_stride, sync_ptr, num_tokens, K, R,
                  num_heads, shrink_chunk, shrink_parts, stride_part, num_shrink, pid, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, SHRINK_K: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr):
    """Shrink program pid's share of the (chunk of blocks, projection h, K slice) tiles:
    part[slice, t, h*R + j] = x[t, slice] @ A_h[s][j, slice] for the tokens t of the chunk's slots,
    j < rank_h[s]. One dot a K tile: every token against every slot of the chunk (the A rows of
    the chunk's slots side by side), each token keeping its own slot's columns."""
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    slot_t = tl.load(slot_ids_ptr + offs_t, mask=t_ok, other=-1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, SHRINK_K)
    per_chunk = num_heads * shrink_parts
    num_chunks = tl.cdiv(tl.load(lay[3]), CHUNK // BLOCK_R)
    for tile in range(pid, num_chunks * per_chunk, num_shrink):
        chunk = tile // per_chunk
        h = (tile % per_chunk) // shrink_parts
        part = tile % shrink_parts
        slot_k, j, k_ok = _chunk_columns(lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, CHUNK, BLOCK_R)
        la_base, la_rows = factor_at(LA, slot_k, 0, h)  # A_h's row j of each column's slot
        k_start = part * shrink_chunk
        k_limit = tl.minimum(K, k_start + shrink_chunk)
        x_ptrs = X[0] + offs_t[:, None] * X[1] + (k_start + offs_k)[None, :] * X[2]
        a_ptrs = (la_base + j * la_rows)[None, :] + (k_start + offs_k)[:, None] * LA[5]
        acc = tl.zeros((BLOCK_T, CHUNK), dtype=tl.float32)
        for k0 in range(k_start, k_limit, SHRINK_K):
            kk_ok = k0 + offs_k < k_limit
            x = tl.load(x_ptrs, mask=t_ok[:, None] & kk_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=kk_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(x, a, acc, IEEE)
            x_ptrs += SHRINK_K * X[2]
            a_ptrs += SHRINK_K * LA[5]
        shrunk, in_chunk = _one_per_token(acc, slot_t, slot_k, k_ok, BLOCK_T, CHUNK, BLOCK_R)
        p_ptrs = P[0] + part * stride_part + offs_t[:, None] * P[1] + (h * R + offs_r)[None, :]
        tl.store(p_ptrs, shrunk, mask=in_chunk[:, None] & (offs_r < R)[None, :])
    tl.debug_barrier()  # every thread's partial sums are stored before the count says so
    tl.atomic_add(sync_ptr, 1, sem="release")


@triton.jit
def _chunk_b(LB, lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, offs_n, n_ok, CHUNK: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """The chunk's columns (_chunk_columns) and its slots' B tiles stacked along K: [CHUNK, BLOCK_N]."""
    slot_k, j, k_ok = _chunk_columns(lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, CHUNK, BLOCK_R)
    lb_base, lb_rows = factor_at(LB, slot_k, 0, 0)  # B rows are the group's output columns
    lb_rows += tl.zeros_like(slot_k)  # a column vector whether the factor's row stride is one or a slot's
    lb = tl.load((lb_base + j * LB[5])[:, None] + offs_n[None, :] * lb_rows[:, None],
                 mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return slot_k, k_ok, lb


@triton.jit
def _add_deltas(acc, LB, P, lay, max_blocks, ranks_ptr, rank_split_stride, ends, sync_ptr, offs_t, slot_t, lora_t,
                offs_n, n_ok, n0, first_chunk, chunk_step, R, shrink_parts, stride_part, num_shrink,
                BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr):
    """acc (rows = tokens) plus the delta of the chunks of layout blocks first_chunk, first_chunk +
    chunk_step, ... on their tokens' rows (lora_t: the tokens that have an adapter); other rows keep
    acc's bits. A chunk is one dot: the tokens' shrinks, each in its slot's columns (zeros in the
    others), against the B tiles of the chunk's slots stacked along K."""
    # the tile's projection: its columns of the partial sums start at h * R
    h = (n0 >= ends[0]).to(tl.int32) + (n0 >= ends[1]).to(tl.int32) + (n0 >= ends[2]).to(tl.int32)
    num_chunks = tl.cdiv(tl.load(lay[3]), CHUNK // BLOCK_R)
    chunk = first_chunk
    # B does not wait for the shrink: its loads are in flight during the wait
    slot_k, k_ok, lb = _chunk_b(LB, lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, offs_n, n_ok, CHUNK,
                                BLOCK_R)
    offs_r = tl.arange(0, BLOCK_R)
    s_ptrs = P[0] + offs_t[:, None] * P[1] + (h * R + offs_r)[None, :]
    s_mask = lora_t[:, None] & (offs_r < R)[None, :]
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while done < num_shrink:  # the shrink programs run first in the grid: this ends
        done = tl.atomic_add(sync_ptr, 0, sem="acquire")
    tl.debug_barrier()
    # each token's shrink, summed over K slices (columns past a slot's rank are masked below,
    # whatever they hold); .cg: written during this launch, not to be read from L1. A runtime loop:
    # unrolled (the count a constant), the split path's expand measured 1.5-3 us slower on the H100
    # (benchmarks/RESULTS.md)
    shrunk = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for part in range(shrink_parts):
        shrunk += tl.load(s_ptrs + part * stride_part, mask=s_mask, other=0.0, cache_modifier=".cg")
    # every column of a slot block holds the token's shrink; the mask below keeps its own slot's
    wide = tl.reshape(tl.broadcast_to(shrunk[:, None, :], (BLOCK_T, CHUNK // BLOCK_R, BLOCK_R)), (BLOCK_T, CHUNK))
    while chunk < num_chunks:
        mine = (slot_t[:, None] == slot_k[None, :]) & k_ok[None, :] & lora_t[:, None]
        # the shrink rounds to B's dtype, as the split path's expand does
        s = tl.where(mine, wide, 0.0).to(lb.dtype)
        acc = tl.where(lora_t[:, None], _dot(s, lb, acc, IEEE), acc)
        chunk += chunk_step
        if chunk < num_chunks:
            slot_k, k_ok, lb = _chunk_b(LB, lay, max_blocks, ranks_ptr, rank_split_stride, h, chunk, R, offs_n, n_ok,
                                        CHUNK, BLOCK_R)
    return acc


# values that follow the token count are not specialised on (Triton would compile anew where one
# turns divisible by 16): one compile per M tile (BLOCK_T) and group
@triton.jit(do_not_specialize=["num_tokens", "stride_part", "num_shrink", "max_blocks"])
def _dense_lora_gemm_kernel(X, W, bias_ptr, C, LA, LB, P, work_ptr, lay, max_blocks, slot_ids_ptr, ranks_ptr,
                            rank_split_stride, ends, sync_ptr, num_tokens, N, K, R, num_heads, k_chunk, shrink_chunk,
                            shrink_parts, stride_part, num_shrink, num_n, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SLICES: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, SHRINK_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
                            PDL: tl.constexpr):
    if PDL != 0:  # x is the launch ahead's output (kernels/pdl.py: PDL_WAIT_FIRST)
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    if HAS_LORA:  # the role by ticket: the shrink's have all started before any program waits
        pid = tl.atomic_add(sync_ptr + 2, 1, sem="relaxed")
    if pid < num_shrink:
        if HAS_LORA:
            _shrink_tiles(X, LA, P, lay, max_blocks, slot_ids_ptr, ranks_ptr, rank_split_stride, sync_ptr, num_tokens,
                          K, R, num_heads, shrink_chunk, shrink_parts, stride_part, num_shrink, pid, BLOCK_T,
                          BLOCK_R, SHRINK_K, CHUNK, IEEE)
    else:
        g = pid - num_shrink
        pid_n = g // K_SLICES
        k_slice = g % K_SLICES
        k_start = k_slice * k_chunk
        k_limit = tl.minimum(K, k_start + k_chunk)
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < num_tokens
        if HAS_LORA:  # read before the K loop: its latency hides there
            slot_t = tl.load(slot_ids_ptr + offs_t, mask=t_ok, other=-1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X[0] + offs_t[:, None] * X[1] + (k_start + offs_k)[None, :] * X[2]
        w_ptrs = W[0] + offs_n[None, :] * W[1] + (k_start + offs_k)[:, None] * W[2]
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_limit, BLOCK_K):
            k_ok = k0 + offs_k < k_limit
            a = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(a, w, acc, IEEE)
            x_ptrs += BLOCK_K * X[2]
            w_ptrs += BLOCK_K * W[2]
        if HAS_LORA:  # the deltas of every K_SLICES-th chunk of blocks, from this slice's: the slices share them out
            acc = _add_deltas(acc, LB, P, lay, max_blocks, ranks_ptr, rank_split_stride, ends, sync_ptr, offs_t, slot_t,
                              t_ok & (slot_t >= 0), offs_n, n_ok, pid_n * BLOCK_N, k_slice, K_SLICES, R,
                              shrink_parts, stride_part, num_shrink, BLOCK_T, BLOCK_R, CHUNK, IEEE)
            # the last program done: no program reads the shrink's count any more
            if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == num_n * K_SLICES - 1:
                tl.atomic_xchg(sync_ptr, 0)
                tl.atomic_xchg(sync_ptr + 1, 0)
                tl.atomic_xchg(sync_ptr + 2, 0)  # every program has its ticket by now
        last = True
        if K_SLICES > 1:  # partial tiles: the tile's last program sums them, in slice order
            offs_w = offs_t[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tile_ws = work_ptr + pid_n * (K_SLICES * BLOCK_T * BLOCK_N)
            tl.store(tile_ws + k_slice * (BLOCK_T * BLOCK_N) + offs_w, acc)
            tl.debug_barrier()
            last = tl.atomic_add(sync_ptr + 3 + pid_n, 1, sem="acq_rel") == K_SLICES - 1
            if last:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(K_SLICES):
                    acc += tl.load(tile_ws + j * (BLOCK_T * BLOCK_N) + offs_w, cache_modifier=".cg")
                tl.atomic_xchg(sync_ptr + 3 + pid_n, 0)
        if last:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            c_ptrs = C[0] + offs_t[:, None] * C[1] + offs_n[None, :] * C[2]
            tl.store(c_ptrs, acc.to(C[0].dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def _sync(device: torch.device) -> Tensor:
    """The device's counters: sync[0] shrink programs done, sync[1] base programs past the wait,
    sync[2] tickets, then a counter a tile. Zero between launches (the kernel leaves them so)."""
    key = str(device)
    if key not in _SYNC:
        # under a graph capture the zeroing would only be recorded: launches before the first
        # replay would read whatever the memory held
        expect(device.type != "cuda" or not torch.cuda.is_current_stream_capturing(),
               "run the fused dense launch once outside a CUDA graph capture first (its counters are made then)")
        _SYNC[key] = torch.zeros(_LAUNCH_COUNTERS + MAX_TILES, dtype=torch.int32, device=device)
    return _SYNC[key]


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few, so that K slices show
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_ok(num_tokens: int, sections: tuple[int, ...]) -> bool:
    """Whether linear_lora takes the fused launch for this group at this size: switched on, decode
    size, and every section end (N among them) a multiple of the base tile, so the tiles, their K
    slices and so the base sums are the same with LoRA and without (q/k/v of every supported model:
    ends at multiples of the head dim, 64 or 128)."""
    tile = FUSED_TILES["block_n"]
    return ENABLED and 0 < num_tokens <= FUSED_MAX_TOKENS and len(sections) <= 4 and \
        all(sum(sections[:h + 1]) % tile == 0 for h in range(len(sections)))


def dense_lora_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, lora: DenseLoRAGroup | None,
                    slot_ids: Tensor | None, layout: VirtualLayout | None, *, sections: tuple[int, ...] = (),
                    k_slices_: int = 0, tiles: dict | None = None) -> Tensor:
    """x @ weight.T (+ bias) plus each token's delta of the group `lora` (None: the base alone, the
    same sums), in one launch; returns the new [T, N] output in x's dtype.

    Args:
        x: [T, K], T <= FUSED_MAX_TOKENS; weight: [N, K]; bias: [N] or None.
        lora, slot_ids, layout: the group, [T] slots (-1: none) and the step's dense layout of them
            (kernels.moe.dense_launch.dense_layout; computed here when None).
        sections: the projections' widths when lora is None (the tile must not straddle two, so that
            the same tiles serve both); lora's own otherwise.
        k_slices_, tiles: the base's K slices (0: about one program per SM) and FUSED_TILES
            overrides, for sweeps.
    """
    from kernels.moe.dense_launch import dense_layout, group_block_n, shrink_partials
    from kernels.moe.launch import LORA_BLOCK_M, _rank_block
    num_tokens, k = x.shape
    n = weight.shape[0]
    sections = lora.sections if lora is not None else (sections or (n,))
    expect(0 < num_tokens <= FUSED_MAX_TOKENS,
           f"the fused launch takes 1 to {FUSED_MAX_TOKENS} tokens, got {num_tokens}")
    expect(weight.dim() == 2 and weight.shape[1] == k and sum(sections) == n,
           f"weight must be [N={sum(sections)}, K={k}], got {tuple(weight.shape)}")
    tiles = {**FUSED_TILES, **(tiles or {})}
    block_n = group_block_n(sections, tiles["block_n"])
    expect(block_n > 0 and len(sections) <= 4, f"no tile of >= 16 columns divides the section ends of {sections}")
    num_n = triton.cdiv(n, block_n)
    expect(num_n <= MAX_TILES, f"at most {MAX_TILES} tiles of {block_n} columns, got {num_n}")
    block_t = max(16, triton.next_power_of_2(num_tokens))
    want = k_slices_ or max(1, min(8, triton.cdiv(_programs(x.device), num_n)))
    k_chunk, slices = k_slices(k, want, tiles["block_k"])
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    work = torch.empty(num_n * slices * block_t * block_n if slices > 1 else 1, dtype=torch.float32,
                       device=x.device)
    sync = _sync(x.device)
    ends = [sum(sections[:h + 1]) for h in range(len(sections) - 1)]
    ends += [n] * (3 - len(ends))
    lora_args, lora_sizes, num_shrink, heads, big_r = (0, 0, out, (out, out, out, out)), (1, 1, 0), 0, 1, 16
    ranks, rank_stride = out, 0
    shrink_k = tiles["shrink_k"]
    rank_tile = _rank_block(lora.max_rank if lora is not None else 16)
    chunk_cols = max(tiles["lora_k"], rank_tile)  # a chunk: chunk_cols // rank_tile blocks
    if lora is not None:
        expect(slot_ids is not None and tuple(slot_ids.shape) == (num_tokens,),
               f"slot_ids must be [T={num_tokens}]")
        if layout is None:
            layout = dense_layout(slot_ids, lora.num_slots)
        expect(layout.num_rows == num_tokens and layout.block_size == LORA_BLOCK_M,
               f"layout is for {layout.num_rows} rows of block {layout.block_size}; x has {num_tokens} rows")
        heads, big_r = lora.num_projections, lora.max_rank
        shrink_chunk, part = shrink_partials(x, lora, 0, shrink_k)
        shrink_parts = part.shape[0]
        chunks = triton.cdiv(layout.max_blocks, chunk_cols // rank_tile)
        num_shrink = min(SHRINK_PROGRAMS, chunks * heads * shrink_parts)
        lora_args = (lora.a.operand(), lora.b.operand(), (part, part.stride(1), 1, big_r),
                     (layout.sorted_ids, layout.block_expert, layout.block_slot, layout.num_blocks))
        lora_sizes = (shrink_chunk, shrink_parts, part.stride(0))
        ranks, rank_stride = lora.ranks, lora.ranks.stride(0)
    la, lb, p, lay = lora_args
    ieee = all(t.dtype == torch.float32 for t in (x, weight))
    _dense_lora_gemm_kernel[(num_shrink + num_n * slices,)](
        (x, x.stride(0), x.stride(1), 0), (weight, weight.stride(0), weight.stride(1)),
        bias if bias is not None else out, (out, out.stride(0), out.stride(1)), la, lb, p, work, lay,
        layout.max_blocks if lora is not None else 0, slot_ids if lora is not None else out, ranks, rank_stride,
        tuple(ends), sync, num_tokens, n, k, big_r, heads,
        k_chunk, *lora_sizes, num_shrink, num_n,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=tiles["block_k"], K_SLICES=slices,
        CHUNK=chunk_cols, BLOCK_R=rank_tile, SHRINK_K=shrink_k, HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None, IEEE=ieee, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        **pdl_args(x.device),
    )
    return out

"""Triton paths of fused_moe: the grouped GEMMs over virtual experts (dense LoRA groups: dense_launch.py).

Shape legend: T = tokens, K = top-k, E = experts, S = slots, R = max rank, D = hidden,
I = expert intermediate. Routed row r = t * K + k.

fused_moe, with LoRA added where the base applies it:
    gu   [T*K, 2I] = x @ Wgu[e].T                  (per-expert layout)
    gu  += (x @ Agu[s,e].T) @ Bgu[s,e].T           (virtual layout; gate and up halves apart)
    act  [T*K, I]  = silu(gu[:, :I]) * gu[:, I:]
    y    [T*K, D]  = w * act @ Wd[e].T
    y   += w * (act @ Ad[s,e].T) @ Bd[s,e].T       (virtual layout)
    out  [T, D]    = y.view(T, K, D).sum(1)
Rows of tokens without an adapter are never in the virtual layout, so they stay bitwise equal
to a run without LoRA.
"""
import os

import torch
import triton
from torch import Tensor

from kernels.moe.align import VirtualLayout, moe_align_virtual
from kernels.moe.activation import silu_mul
from kernels.moe.down_fold import rank_block, silu_mul_shrink, topk_sum
from kernels.checks import check_moe_args
from kernels.errors import expect
from kernels.moe.expand import lora_expand
from kernels.moe.grouped_gemm import lora_expand_tiles, lora_shrink, moe_gemm
from kernels.moe.lora_rows import lora_rows_, row_partials
from kernels.weights import SHAREABLE, Factor, MoELoRAWeights

LORA_BLOCK_M = 16  # rows per (slot, expert) block: pairs hold few rows each


# The base GEMMs' block rows by routed rows an expert (mean): (most rows an expert, block rows), 128
# past the last. A block holding all of an expert's rows reads its weights once; rows an expert
# vary (routing), so an expert with a few more than the mean needs a second block, and a second
# read of its weights, when the block is the mean's size. `bench_moe_lora.py --sweep-base` (H100,
# 2026-12-06, benchmarks/RESULTS.md, kernels): qwen3's two GEMMs at 16 rows an expert (M = 256)
# 444.6 us at 16-row blocks against 421.3 at 32, at 32 rows (M = 512) 471.8 at 32-row blocks
# against 427.3 at 64; at 64 rows (M = 1024) 64 and 128 even.
BASE_BLOCK_M_STEPS = ((12, 16), (24, 32), (96, 64))


def _base_block_m(num_rows: int, num_experts: int) -> int:
    per_expert = num_rows / max(1, num_experts)
    return next((block_m for most, block_m in BASE_BLOCK_M_STEPS if per_expert <= most), 128)


def _base_config(block_m: int) -> dict:
    """Tiles of the base GEMMs: decode streams weights (long K tiles), prefill wants big tiles."""
    if block_m <= 16:
        return {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
    if block_m <= 32:
        return {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4}
    if block_m <= 64:  # H200 sweep, qwen3 gate_up M=2048 at 64 rows: 323 TFLOP/s vs 281 with 8 warps
        return {"block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3}
    return {"block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3}  # 355 TFLOP/s there


# The base GEMM walks its tiles by groups of BASE_GROUP_M blocks (moe_gemm's group_m) where a block
# has many N tiles: block by block, a projection of 112 N tiles (Mixtral's gate/up, 2I = 28672)
# streamed an expert's 235 MB of weights from DRAM once for each of its blocks, since the programs
# in flight hold only ~2 blocks' tiles. `bench_moe_lora.py --sweep-base` (H100, 2026-12-06,
# benchmarks/RESULTS.md, kernels): Mixtral's gate/up at 128-row blocks 0.93 / 2.94 / 11.6 ms ->
# 0.74 / 1.69 / 6.02 ms at M = 512 / 2048 / 8192 with groups of 16; its down at 64-row blocks (32 N
# tiles of 128) 0.50 / 1.49 / 8.00 -> 0.41 / 1.29 / 6.43 ms. At 128-row blocks its down (16 N tiles,
# an expert's blocks in flight together anyway) and qwen3's GEMMs (6 to 16 tiles) gain nothing.
# Prefill sizes only (64-row blocks and up): decode's tiles were not swept with it.
BASE_GROUP_M = 16
BASE_GROUP_MIN_N_TILES = 32


def _base_group_m(block_m: int, n: int, block_n: int) -> int:
    return BASE_GROUP_M if block_m >= 64 and triton.cdiv(n, block_n) >= BASE_GROUP_MIN_N_TILES else 1


# LoRA tiles from `bench_moe_lora.py --sweep-lora` (H200, qwen3, n = 16, M = 64/512/2048):
# shrink (a long, thin A) at block_k 128 with 2 warps is 15-25% faster than 256 with 4 warps;
# expand (K = R deep, one step) wants wide N tiles, fewer latency-bound tile visits: 256 beats
# 128 by 10-20% and 64 by 30-40%.
SHRINK = {"block_k": 128, "num_warps": 2, "num_stages": 3}
EXPAND = {"block_n": 256, "num_warps": 4, "num_stages": 1}
EXPAND_BLOCKS = {"block_n": 256, "num_warps": 4, "num_stages": 3}  # kernels/moe/expand.py, see there
# The MoE expands: kernels/moe/expand.py (programs own a block, loop over its N tiles) from
# EXPAND_BLOCKS_MIN_ROWS routed rows up, grouped_gemm's (block, n-tile) grid below. From
# `--sweep-lora` on every preset (H100, n = 16, 2026-12-06; benchmarks/RESULTS.md, kernels): with
# a block's columns cut in parts (_expand_blocks_config) the blocks beat the tiles from 16 rows up
# on gate/up (Mixtral at M = 8 / 32: 12.0 / 31.2 us against 13.4 / 46.0; qwen3 at M = 128: 27.0
# against 35.0) and the pair of expands with them (Mixtral M = 8: 17.8 against 18.5 us, its down
# alone 5.8 against 5.1), the tiles at 2 rows (Mixtral M = 1 gate/up: 5.4 against 11.5). The LoRA
# paths "split-tiles" and "split-blocks" force one (A/B runs).
EXPAND_BLOCKS_MIN_ROWS = 16
EXPAND_BLOCKS_TILES_A_PART = 4
# A long reduction (Mixtral's K = 4096 and 14336) walks fewer, longer steps: 256-deep tiles took
# Mixtral's down shrink from 41 to 27 us at M = 1 and from 57 to 40 us at M = 512 (same sweep);
# at K = 768-2048 (qwen3, OLMoE) they went from 10% faster to 30% slower, so those keep 128.
SHRINK_LONG_K = 4096


def _expand_by_blocks(num_rows: int, expand: str) -> bool:
    return expand == "blocks" or (expand == "auto" and num_rows >= EXPAND_BLOCKS_MIN_ROWS)


def _expand_blocks_config(n: int) -> dict:
    """lora_expand's tiles for N columns a split: as many parts as a split has N tiles over
    EXPAND_BLOCKS_TILES_A_PART (a power of two, at most 8); the parts share a block's tiles of
    every split, so a part walks about that many of each. A long expand (Mixtral's 14336 gate/up
    columns: 56 tiles a split) then runs on several programs a block instead of one (227.5 -> 85.8
    us at M = 512 in that sweep)."""
    tiles = triton.cdiv(n, EXPAND_BLOCKS["block_n"])
    parts = 1 << (max(1, min(8, tiles // EXPAND_BLOCKS_TILES_A_PART)).bit_length() - 1)
    return {**EXPAND_BLOCKS, "parts": parts}


def _shrink_config(k: int) -> dict:
    return {**SHRINK, "block_k": 256} if k >= SHRINK_LONG_K else SHRINK


def _rank_block(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


# The LoRA delta at decode sizes: a program per routed row (kernels/moe/lora_rows.py) up to
# ROWS_MAX_ROWS routed rows, where a row's expand is short (2I <= ROWS_MAX_EXPAND), one token
# included; where it is not, the split path at every size. H200, n = 16, virtual / base
# (benchmarks/RESULTS.md, kernels): qwen3 M = 32 / 64 / 128 rows 1.15 / 1.17 / 1.29 vs blocks 1.21 /
# 1.24 / 1.41, olmoe alike; M = 8 even; Mixtral (2I = 28672, one program streams a whole row's B)
# rows 1.23-1.38 vs blocks 1.16-1.19 at every M. At one token the
# row launches run beside the base GEMMs (PDL, kernels/pdl.py) where the fused launch lengthens them:
# H100, qwen3 n = 16 / 64, rows 1.19 / 1.15 against fused 1.22 / 1.17, olmoe even. Mixtral's one
# token takes the split path too: H100, n = 16, 1.05 against fused 1.18 and rows 1.21 (2026-12-06;
# on the H200 the fused launch cost 1.43). The fused launch stays as a path to force ("fused").
ROWS_MAX_ROWS = 1024
ROWS_MAX_EXPAND = 8192
# Row tiles from `bench_moe_lora.py --sweep-rows` (H200): at rank 16 (qwen3, n = 16, M = 1 / 8 / 64)
# 256-deep K tiles, 128-wide N tiles, 4 warps (down: 128-deep within 1 us); programs a row (`parts`)
# so that a launch has ~1024 programs. tile_r 32 sizes the rank buckets of a wider pool: at ranks
# 8 / 16 / 32 / 64 over 25 adapters (M = 40 / 64), gate_up 57.4 -> 45.2 / 83.8 -> 67.1 us and down
# 51.4 -> 38.1 / 72.3 -> 52.8 us against every row at the rank-64 tile (RESULTS.md, kernels).
ROWS_TILES_GATE_UP = {"block_k": 256, "block_n": 128, "num_warps": 4, "num_stages": 3, "tile_r": 32}
ROWS_TILES_DOWN = {"block_k": 128, "block_n": 128, "num_warps": 4, "num_stages": 3, "tile_r": 32}  # "rows-apart"
ROWS_PROGRAMS = 1024
ROWS_MAX_PARTS = 4
LORA_PATHS = ("auto", "rows", "rows-inplace", "rows-apart", "split", "split-tiles", "split-blocks", "fused")
# The row path "auto" takes past one token: the gate/up delta added in place. The rank slices
# ("rows"; MOEPLEX_ROWS_INTO=1 takes them at every size) measured no better there: H100, qwen3
# n = 16, virtual / base at M = 8 / 32 / 64 1.08 / 1.11 / 1.12 against in place 1.08 / 1.10 / 1.11,
# and the engine's decode step with 16 adapters at batch 64 19.34 against 19.26 ms (2026-12-07).
ROWS_AUTO = "rows" if os.environ.get("MOEPLEX_ROWS_INTO", "0") == "1" else "rows-inplace"
# At one token the slices win: the row launch then runs wholly beside the base GEMM, which at M = 1
# is short enough for that to show (same run: 1.17 against 1.21)
ROWS_ONE_TOKEN = "rows"


def lora_path(num_tokens: int, top_k: int, inter: int) -> str:
    """Which path computes the LoRA delta of a layer of this size (see LORA_PATHS; at decode size
    ROWS_AUTO, at one token ROWS_ONE_TOKEN). The row paths: "rows-inplace" folds the down delta into
    the activation and top-k sum launches (kernels/moe/down_fold.py) and adds the gate/up delta into
    the GEMM's output in place; "rows" also folds the gate/up delta, by rank slices, into the activation's reads
    (lora_rows_'s into); "rows-apart" gives the down delta its own row launch (an A/B baseline)."""
    if num_tokens * top_k <= ROWS_MAX_ROWS and 2 * inter <= ROWS_MAX_EXPAND:
        return ROWS_ONE_TOKEN if num_tokens == 1 else ROWS_AUTO
    return "split"


def _row_parts(num_rows: int, splits: int) -> int:
    return max(1, min(ROWS_MAX_PARTS, ROWS_PROGRAMS // max(1, num_rows * splits)))


def fused_moe_triton(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
                     topk_ids: Tensor, lora: MoELoRAWeights | None = None,
                     slot_ids: Tensor | None = None, path: str = "auto") -> Tensor:
    """Triton twin of fused_moe_ref (same Semantics and Args). path picks how the LoRA delta
    runs (LORA_PATHS; "auto": lora_path): by rows, by (slot, expert) blocks after the base
    GEMMs ("split"; "split-tiles" / "split-blocks" force its expand), or inside the base GEMMs
    over expert-major blocks ("fused": fused_path_ok)."""
    check_moe_args(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    expect(path in LORA_PATHS, f"path must be one of {LORA_PATHS}, got {path!r}")
    num_tokens, top_k = topk_ids.shape
    num_experts, d, _ = w_down.shape
    if num_tokens * top_k == 0:
        return hidden.new_zeros(num_tokens, d)
    inter = w_down.shape[2]
    if lora is None:
        return moe_with_layouts(hidden, w_gate_up, w_down, topk_weights, topk_ids, None, [])
    path = lora_path(num_tokens, top_k, inter) if path == "auto" else path
    if path in ("rows", "rows-inplace", "rows-apart"):
        return moe_with_layouts(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, [], row_slots=slot_ids,
                                fold_down=path != "rows-apart", fold_gate_up=path == "rows")
    if path == "fused":
        expect(fused_path_ok(num_tokens, inter), f"the fused path takes one token and I a multiple of "
               f"{_base_config(16)['block_n']}, got {num_tokens} tokens and I = {inter}")
        lay = moe_align_virtual(topk_ids, slot_ids, num_experts, 16, lora.num_slots, expert_major=True)
        return moe_with_layouts(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, [], lay)
    vlays = [moe_align_virtual(topk_ids, slot_ids, num_experts, LORA_BLOCK_M, lora.num_slots)]
    expand = path.removeprefix("split").removeprefix("-") or "auto"
    shared = None
    if lora.shared_halves:
        shared = (SharedTokens.of(lora.gate_up_a, lora.ranks, slot_ids), SharedTokens.of(lora.down_b, lora.ranks, slot_ids))
    return moe_with_layouts(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, vlays, expand=expand,
                            shared=shared)


def fused_path_ok(num_tokens: int, inter: int) -> bool:
    """One launch per GEMM with the LoRA inside, over (expert, slot) blocks: only for a single
    token, where pairs are exactly the experts. With more tokens each extra slot on an expert
    re-streams that expert's weights (H200: 1.5-9x the base at M = 8-128, qwen3 n = 16)."""
    return num_tokens == 1 and inter % _base_config(16)["block_n"] == 0


def moe_with_layouts(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
                     topk_ids: Tensor, lora: MoELoRAWeights | None, vlays: list[VirtualLayout],
                     fused_layout: VirtualLayout | None = None, row_slots: Tensor | None = None,
                     expand: str = "auto", shared: "tuple[SharedTokens | None, SharedTokens | None] | None" = None,
                     fold_down: bool = True, fold_gate_up: bool = True) -> Tensor:
    """The base MoE with LoRA over each given virtual layout (one for all adapters, or one
    per adapter for the conventional per-adapter loop the benchmark compares against), or,
    given an expert-major fused_layout, base and LoRA in the same launches, or, given
    row_slots (the tokens' slot ids), LoRA by routed rows, the down delta folded into the activation
    and the top-k sum (kernels/moe/down_fold.py; fold_down=False: by its own row launch, the
    path before the fold, for A/B runs), and, with fold_down, the gate/up delta by rank slices that
    the activation adds as it reads gate_up (fold_gate_up=False: added into gate_up in place, for A/B
    runs). expand: the layouts' expand kernel,
    "tiles", "blocks" or "auto" (by row count). shared (one layout only): the tokens on slots
    whose gate/up A, and those whose down B, every expert shares (SharedTokens): their gate/up
    shrink runs once a token and their down expand once a token, on the top-k sum."""
    num_tokens, top_k = topk_ids.shape
    num_experts, d, inter = w_down.shape
    rows = num_tokens * top_k
    base = fused_layout
    if base is None:
        base = moe_align_virtual(topk_ids, None, num_experts, _base_block_m(rows, num_experts))
    fused = fused_layout is not None
    fused_kw = lambda a, b, half: {"fused_lora": (a, b, lora.ranks, half)} if fused else {}  # noqa: E731
    weights = topk_weights.reshape(-1).float()
    gate_up = hidden.new_empty(rows, 2 * inter)
    cfg = _base_config(base.block_size)
    moe_gemm(hidden, w_gate_up, gate_up, base, n=2 * inter, k=d, a_row_div=top_k, **cfg,
             group_m=_base_group_m(base.block_size, 2 * inter, cfg["block_n"]),
             **fused_kw(lora and lora.gate_up_a, lora and lora.gate_up_b, inter))
    shared_a, shared_b = shared or (None, None)
    for vlay in vlays:
        _lora_gate_up_(hidden, gate_up, lora, vlay, top_k, expand, shared_a)
    gate_up_delta = None
    if row_slots is not None:
        if fold_down and fold_gate_up:
            # the row programs write this before they wait for the base GEMM ahead: safe, since every
            # tensor that GEMM reads or writes is still referenced here (the allocator cannot hand
            # out their memory) and the GEMM is no PDL launch itself (nothing before it still runs)
            gate_up_delta = row_partials(rows, 2 * inter, lora.gate_up_a.shape[2] // 2, hidden.device)
        lora_rows_(hidden, gate_up, lora.gate_up_a, lora.gate_up_b, lora.ranks, row_slots, topk_ids,
                   a_row_div=top_k, splits=2, pdl_early=not vlays, into=gate_up_delta,
                   parts=_row_parts(rows, 2 * (1 if gate_up_delta is None else gate_up_delta.buffer.shape[1])),
                   **ROWS_TILES_GATE_UP)
    act = hidden.new_empty(rows, inter)
    folded = None
    if row_slots is not None and fold_down:
        shrunk = torch.empty(rows, rank_block(lora.max_rank), dtype=torch.float32, device=hidden.device)
        silu_mul_shrink(gate_up, act, shrunk, lora.down_a, lora.ranks, row_slots, topk_ids, pdl_early=True,
                        gate_up_delta=gate_up_delta)
        folded = (lora.down_b, lora.ranks, shrunk, weights, row_slots, topk_ids)
    else:
        silu_mul(gate_up, act)
    y = hidden.new_empty(rows, d)
    moe_gemm(act, w_down, y, base, n=d, k=inter, scale=weights, **cfg,
             group_m=_base_group_m(base.block_size, d, cfg["block_n"]),
             **fused_kw(lora and lora.down_a, lora and lora.down_b, d))
    token_down = None
    for vlay in vlays:
        token_down = _lora_down_(act, y, lora, vlay, weights, expand, shared_b)
    if row_slots is not None and not fold_down:
        lora_rows_(act, y, lora.down_a, lora.down_b, lora.ranks, row_slots, topk_ids, a_row_div=1,
                   scale=weights, parts=_row_parts(rows, 1), pdl_early=not vlays, **ROWS_TILES_DOWN)
    # with the fold, the launch ahead of the top-k sum is the base down GEMM (the row path has no vlays)
    out = topk_sum(y, hidden.new_empty(num_tokens, d), top_k, folded, pdl_early=not vlays)
    if token_down is not None:  # out[t] += (sum_k w_k * shrunk_k) @ B_shared.T, once a token
        r = lora.max_rank
        lora_expand_tiles(token_down, lora.down_b, out, shared_b.layout, lora.ranks, n=d, k=r,
                          block_k=_rank_block(r), **EXPAND)
    return out


class SharedTokens:
    """The tokens on slots whose half of a shareable factor (the shared-outer format's gate/up A or
    down B) is one matrix for every expert: `tokens` [T] bool, `layout` (their rows by slot, one
    expert, for a shrink or expand once a token) and `row_ranks` (the slots' ranks with those
    slots' zeroed: the per-row launches then leave their rows alone). No host sync."""

    def __init__(self, tokens: Tensor, layout: VirtualLayout, row_ranks: Tensor):
        self.tokens, self.layout, self.row_ranks = tokens, layout, row_ranks

    @classmethod
    def of(cls, factor: Factor, ranks: Tensor, slot_ids: Tensor) -> "SharedTokens | None":
        """None for a factor without shareable slots (padded stacks, or not SHAREABLE)."""
        if not isinstance(factor, Factor) or not factor.ranked & SHAREABLE:
            return None
        shared_slot = factor.ranks < 0
        tokens = (slot_ids >= 0) & shared_slot[slot_ids.long().clamp_min(0)]
        one_expert = torch.zeros(slot_ids.shape[0], 1, dtype=torch.int32, device=slot_ids.device)
        layout = moe_align_virtual(one_expert, torch.where(tokens, slot_ids, -1).to(torch.int32), 1,
                                   LORA_BLOCK_M, factor.shape[0])
        return cls(tokens, layout, torch.where(shared_slot, 0, ranks))


def _lora_gate_up_(hidden: Tensor, gate_up: Tensor, lora: MoELoRAWeights,
                   vlay: VirtualLayout, top_k: int, expand: str, shared: SharedTokens | None = None) -> None:
    """gate_up[:, :I] += (x @ A_gate.T) @ B_gate.T; gate_up[:, I:] += (x @ A_up.T) @ B_up.T. With
    `shared`, the rows of its tokens take one shrink a token (their A is every expert's)."""
    r = lora.max_rank
    inter = gate_up.shape[1] // 2
    d = hidden.shape[1]
    rb = _rank_block(r)
    shrunk = torch.empty(gate_up.shape[0], 2 * r, dtype=torch.float32, device=hidden.device)
    # split h in {gate, up}: A rows [h*R, h*R + r_s) -> shrunk cols [h*R, h*R + r_s)
    # the launch ahead (the base GEMM, or the expand of the layout before) writes gate_up only
    lora_shrink(hidden, lora.gate_up_a, shrunk, vlay, lora.ranks if shared is None else shared.row_ranks,
                n=r, k=d, a_row_div=top_k, splits=2, block_n=rb, pdl_early=True, **_shrink_config(d))
    if shared is not None:  # x[t] @ A.T once a token, then its rows take it
        per_token = torch.empty(hidden.shape[0], 2 * r, dtype=torch.float32, device=hidden.device)
        lora_shrink(hidden, lora.gate_up_a, per_token, shared.layout, lora.ranks, n=r, k=d, splits=2,
                    block_n=rb, pdl_early=True, **_shrink_config(d))
        rows_shared = shared.tokens.repeat_interleave(top_k)[:, None]
        shrunk = torch.where(rows_shared, per_token.repeat_interleave(top_k, dim=0), shrunk)
    # split h: shrunk cols [h*R, h*R + r_s) @ B rows [h*I, (h+1)*I) -> gate_up cols [h*I, (h+1)*I)
    if not _expand_by_blocks(vlay.num_rows, expand):
        lora_expand_tiles(shrunk, lora.gate_up_b, gate_up, vlay, lora.ranks, n=inter, k=r, splits=2,
                          block_k=rb, **EXPAND)
    else:  # one program a block, gate's tiles then up's
        lora_expand(shrunk, lora.gate_up_b, gate_up, vlay, lora.ranks, splits=2, **_expand_blocks_config(inter))


def _lora_down_(act: Tensor, y: Tensor, lora: MoELoRAWeights, vlay: VirtualLayout,
                weights: Tensor, expand: str, shared: SharedTokens | None = None) -> Tensor | None:
    """y += w * (act @ A_down.T) @ B_down.T on rows with an adapter. With `shared`, its tokens'
    rows are left out of the expand and their weighted shrinks summed over the top-k instead:
    returns those sums [T, R] (fp32; rows of other tokens unread) for one expand a token."""
    r = lora.max_rank
    rb = _rank_block(r)
    # zeros where a token's sum may meet a row the layout left out (routing ids out of range)
    shrunk = (torch.empty if shared is None else torch.zeros)(act.shape[0], r, dtype=torch.float32, device=act.device)
    # the launch ahead (the base GEMM, the expand of the layout before, or shrunk's zeros) writes y or shrunk
    lora_shrink(act, lora.down_a, shrunk, vlay, lora.ranks, n=r, k=act.shape[1], block_n=rb, pdl_early=True,
                **_shrink_config(act.shape[1]))
    ranks = lora.ranks if shared is None else shared.row_ranks
    if not _expand_by_blocks(vlay.num_rows, expand):
        lora_expand_tiles(shrunk, lora.down_b, y, vlay, ranks, n=y.shape[1], k=r, scale=weights,
                          block_k=rb, **EXPAND)
    else:
        lora_expand(shrunk, lora.down_b, y, vlay, ranks, scale=weights, **_expand_blocks_config(y.shape[1]))
    if shared is None:
        return None
    top_k = act.shape[0] // shared.tokens.shape[0]
    return (shrunk.view(-1, top_k, r) * weights.view(-1, top_k, 1)).sum(dim=1)


def token_breakpoints(num_experts: int, top_k: int, max_tokens: int) -> list[int]:
    """Token counts on both sides of every size at which a launch choice of this module changes
    (alignment path and its power-of-two tiles, base tile rows, LoRA and expand paths), for MoE layers
    (T * top_k routed rows) and dense LoRA groups (T rows); within 1..max_tokens, sorted.

    Between two consecutive breakpoints every Triton specialisation of a step is the same (the
    token counts themselves are do_not_specialize), so a warm-up that runs one step at each
    compiles what any step size will need (tests/engine/test_warmup.py checks this)."""
    from kernels.moe.align_multi import CHUNK
    from kernels.moe.align_triton import MAX_ROWS, SINGLE_PROGRAM_ROWS
    from kernels.moe.dense_gemm import FUSED_MAX_TOKENS
    from kernels.moe.dense_launch import DENSE_ROWS_MAX_TOKENS, DENSE_ROWS_MAX_TOKENS_STACKED
    rows = {SINGLE_PROGRAM_ROWS, MAX_ROWS, EXPAND_BLOCKS_MIN_ROWS, ROWS_MAX_ROWS, DENSE_ROWS_MAX_TOKENS,
            DENSE_ROWS_MAX_TOKENS_STACKED, FUSED_MAX_TOKENS}
    rows |= {16, 32}  # the fused dense launch's M tile (dense_gemm: the token count's power of two, >= 16)
    rows |= {most * num_experts for most, _ in BASE_BLOCK_M_STEPS}  # _base_block_m
    rows |= {1 << p for p in range(4, (max_tokens * top_k).bit_length() + 1)}  # align_triton's NP
    rows |= {CHUNK << p for p in range(max(1, (max_tokens * top_k).bit_length()))}  # align_multi's chunks
    tokens = {1, 2, max_tokens}
    for r in rows:
        for per_token in (top_k, 1):
            t = r // per_token
            tokens |= {t, t + 1}
    return sorted(t for t in tokens if 1 <= t <= max_tokens)

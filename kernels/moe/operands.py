"""Helpers the grouped GEMM, the row kernel and the block expand share: where a LoRA factor's
slot starts and how its rows step (kernels.weights.Factor), and the sizes of persistent and
K-split grids."""
import torch
import triton
import triton.language as tl


@triton.jit
def factor_at(F, slot, expert, h):
    """(address of row 0, column 0 of split h of a LoRA factor's (slot, expert) matrix, its row
    stride). The table counts in units of F[7] elements: a unit of 16 (specialised as such) tells
    the compiler the slot's first element is 16-element aligned, so its loads vectorise as a
    padded stack's do. F[8], a compile-time constant, says whether the factor is ranked: then the
    strides that step over the rank are in units of the slot's rank rounded up to 16, a multiple
    of 16 the compiler sees; a plain factor reads no rank and keeps its strides' specialisations.
    A shareable one (F[8] & 4) reads a negative rank as "one matrix for every expert": expert
    stride 0 for that slot. With F[8] & 8 (RANK_UNIT_8) the rank rounds up to 8 instead."""
    slot = tl.maximum(slot, 0)
    expert_stride = F[3]
    row_stride = F[4]
    if F[8] != 0:  # RANKED_ROWS (1) or RANKED_COLS (2), maybe | SHAREABLE (4) | RANK_UNIT_8 (8): kernels.weights.Factor
        rank = tl.load(F[9] + slot)
        if (F[8] & 4) != 0:
            expert_stride = tl.where(rank < 0, 0, expert_stride)
            rank = tl.abs(rank)
        if (F[8] & 8) != 0:  # RANK_UNIT_8: laid out at the rank rounded up to 8
            r16 = tl.cdiv(rank, 8) * 8
        else:
            r16 = tl.cdiv(rank, 16) * 16  # kernels.weights.RANK_UNIT
        expert_stride = expert_stride * r16
        if (F[8] & 3) == 2:
            row_stride = row_stride * r16
    base = F[0] + tl.load(F[1] + h * F[2] + slot) * F[7] + expert * expert_stride + h * F[6] * row_stride
    return base, row_stride


def num_programs(device: torch.device, max_tiles: int) -> int:
    """Persistent-grid size: enough programs for max_tiles, at most 16 resident a CUDA SM."""
    if device.type != "cuda":
        return max(1, min(max_tiles, 4))  # interpreter: few programs, each loops
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_tiles, sms * 16))  # enough resident CTAs to hide small tiles' latency


def k_slices(k: int, k_splits: int, block_k: int) -> tuple[int, int]:
    """(slice width, number of slices) of a k_splits shrink: widths are whole block_k tiles,
    so there may be fewer slices than asked (k = 2304 in 8: 6 slices of 384)."""
    if k_splits <= 1:
        return k, 1
    chunk = triton.cdiv(triton.cdiv(k, k_splits), block_k) * block_k
    return chunk, triton.cdiv(k, chunk)

"""Helpers the grouped GEMM, the row kernel and the block expand share: where a LoRA factor's
slot starts (kernels.weights.Factor), and the sizes of persistent and K-split grids."""
import torch
import triton
import triton.language as tl


@triton.jit
def factor_base(F, slot, expert, h):
    """Address of row 0, column 0 of split h of a LoRA factor's (slot, expert) matrix. The table
    counts in units of F[7] elements: a unit of 16 (specialised as such) tells the compiler the
    slot's first element is 16-element aligned, so its loads vectorise as a padded stack's do."""
    return F[0] + tl.load(F[1] + h * F[2] + tl.maximum(slot, 0)) * F[7] + expert * F[3] + h * F[6] * F[4]


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

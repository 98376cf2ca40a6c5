"""Which path an op takes: Triton kernels or the torch references."""
import os

from torch import Tensor


def use_triton(tensor: Tensor) -> bool:
    """True when ops on `tensor` should run the Triton kernels (CUDA, or MOEPLEX_TRITON=1)."""
    return tensor.is_cuda or os.environ.get("MOEPLEX_TRITON") == "1"

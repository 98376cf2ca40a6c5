"""Read a safetensors file without torch: parse the header, check values are finite.

Layout: 8 bytes little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the tensor bytes, offsets relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapter_store.errors import ValidationError

# The most any adapter needs (~70k tensors of the largest supported model); callers that
# know the base model pass a tighter bound (limits.max_header_bytes).
MAX_HEADER_BYTES = 16 << 20
# LoRA tensors are 2-D; a shape of millions of dimensions would make its size product slow.
MAX_DIMS = 8
# Floating dtypes a LoRA adapter may hold, as (unsigned view, exponent mask, itemsize).
# A float is NaN or Inf exactly when all its exponent bits are set; bf16 has no numpy
# dtype, so every float is read as unsigned integers and its exponent bits tested.
FLOAT_DTYPES = {
    "F64": (np.dtype("<u8"), 0x7FF0000000000000, 8),
    "F32": (np.dtype("<u4"), 0x7F800000, 4),
    "F16": (np.dtype("<u2"), 0x7C00, 2),
    "BF16": (np.dtype("<u2"), 0x7F80, 2),
}
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, slots=True)
class TensorEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


def _bad(message: str) -> ValidationError:
    return ValidationError(
        f"adapter_model.safetensors is not a valid safetensors file: {message}; "
        "re-save it with safetensors (e.g. PEFT's save_pretrained(safe_serialization=True))",
        code="bad_safetensors",
    )


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> list[TensorEntry]:
    """Parse and check the header of `path`; raise ValidationError if malformed.

    The header length is checked against `max_header_bytes` before any of it is read.
    Whatever Python's json accepts but the safetensors library refuses (UTF-16, NaN, a
    `__metadata__` that is not an object of strings) is refused here, so that an adapter
    stored is an adapter every replica can open.
    """
    limit = min(max_header_bytes, MAX_HEADER_BYTES)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad("file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > file_size - 8:
            raise _bad(f"header length {n} exceeds the file")
        if n > limit:
            raise _bad(f"header of {n} bytes is over {limit}, more than an adapter of this "
                       "base model needs")
        header = _parse_header(f.read(n))
    _check_metadata(header.pop("__metadata__", None))
    entries = [_entry(key, meta, 8 + n) for key, meta in header.items()]
    _check_layout(entries, 8 + n, file_size)
    return entries


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also integers of 4300+ digits
        raise _bad(f"header is not JSON ({exc})") from None
    except RecursionError:
        raise _bad("header nests arrays or objects too deeply") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    return header


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_metadata(metadata) -> None:
    """safetensors reads `__metadata__` as a map of strings to strings, or its absence."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("__metadata__ must be an object of string values")


def _entry(key: str, meta, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        ok = isinstance(dtype, str) and len(shape) <= MAX_DIMS and \
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _bad(f"tensor {key!r} has a malformed header entry")
    if dtype not in FLOAT_DTYPES:
        raise ValidationError(
            f"tensor {key!r} has dtype {dtype}; LoRA weights must be floating point "
            f"({', '.join(FLOAT_DTYPES)})", code="bad_dtype")
    if end - begin != math.prod(shape) * FLOAT_DTYPES[dtype][2]:
        raise _bad(f"tensor {key!r}: byte range does not match dtype and shape {list(shape)}")
    return TensorEntry(key, dtype, shape, data_start + begin, data_start + end)


def _check_layout(entries: list[TensorEntry], data_start: int, file_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, no trailing bytes."""
    cursor = data_start
    for e in sorted(entries, key=lambda e: e.begin):
        if e.begin != cursor:
            raise _bad(f"tensor {e.key!r} overlaps another or leaves a gap")
        cursor = e.end
    if cursor != file_size:
        raise _bad(f"data section ends at byte {cursor} but the file has {file_size}")


@dataclass(frozen=True, slots=True)
class ValueScan:
    non_finite: int  # NaN/Inf values
    max_abs: float  # the largest magnitude among the finite values (0.0 when none)


# the float type each stored dtype's bits read back as (bf16: its bits are an fp32's top half)
_AS_FLOAT = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<f4")}


def scan_values(path: Path, entry: TensorEntry) -> ValueScan:
    """NaN/Inf count and largest finite magnitude of one tensor, read in chunks through a memory
    map, on the raw bits: an IEEE float's magnitude orders as its bits without the sign do."""
    view, mask, itemsize = FLOAT_DTYPES[entry.dtype]
    count = (entry.end - entry.begin) // itemsize
    if count == 0:
        return ValueScan(0, 0.0)
    magnitude_bits = view.type((1 << (8 * itemsize - 1)) - 1)
    exponent = view.type(mask)
    data = np.memmap(path, dtype=view, mode="r", offset=entry.begin, shape=(count,))
    bad, largest = 0, view.type(0)
    for start in range(0, count, _CHUNK_ELEMENTS):
        magnitudes = data[start:start + _CHUNK_ELEMENTS] & magnitude_bits
        finite = (magnitudes & exponent) != exponent
        non_finite = int(np.count_nonzero(~finite))
        bad += non_finite
        if non_finite < magnitudes.size:
            largest = max(largest, magnitudes[finite].max())
    del data
    bits = np.array([largest], dtype=view)
    if entry.dtype == "BF16":
        bits = bits.astype("<u4") << 16
    return ValueScan(bad, float(bits.view(_AS_FLOAT[entry.dtype])[0]))

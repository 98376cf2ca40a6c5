"""Pinned host memory for the host tier's adapter images, pinned a piece at a time and kept.

Why not `torch.empty(..., pin_memory=True)` per image: torch's pinned allocator asks the driver
for every block it has not cached (cudaHostAlloc), and page-locking holds a lock of the NVIDIA
driver for as long as it pins: a 280 MB image (512 MB, as that allocator rounds it up to a power
of two) pins for a large part of a second, and every CUDA call of the step loop meanwhile (graph
launch, input copy, event query) waits for it. The served slot_hog flood on the H200 showed
stalls of that size while fresh adapters came into the host tier, and none in the engine alone,
whose adapters were in the tier before it started (benchmarks/RESULTS.md, Floods). The rounding
also pins up to twice an image's bytes, and blocks cached in one size class serve no other, so
pinned memory grows past the tier's byte bound as adapter sizes mix.

Here images live in chunks of ordinary (pageable) memory reserved as needed; a chunk is
page-locked from its bottom up, `piece_bytes` at a time (cudaHostRegister), only as far as
images have needed. A piece's pages are faulted in before the driver is called, so its lock is
held only to pin them, and between two pieces the loader sleeps twice as long as the last one
held it: the step loop's calls get the driver for at least two thirds of the time. Pinned bytes are kept for the next images (a freed span is reused, first fit,
as the device heap does: engine.lora.spans), so once the tier has filled nothing is pinned
again; they never exceed `limit_bytes`. An image that finds no room within the limit (or
whose pinning the driver refuses) gets pageable memory: its slot copies are then synchronous,
staged by the driver, and still correct. Pieces start at multiples of `piece_bytes` in the
address space, so a copy that is split at those multiples (SlotPools.align_copies) never reads
across two registrations.

Threads: `allocate` runs on the loader threads (one at a time: the lock is held while a piece
is pinned); `release` runs on the step thread and never waits for that lock (it queues the span,
the next `allocate` takes it back).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.lora.spans import SpanAllocator

log = logging.getLogger("engine.lora")

PIECE_BYTES = 8 << 20  # pinned per driver call: a few milliseconds of the driver's lock
PAUSE_S = 0.001  # at least this long between two pieces, for the step loop's calls
PAUSE_PER_HOLD = 2.0  # and this many times the last piece's locking: the step loop gets 2/3 of the time
UNIT = 16  # elements; every image starts 16-element aligned


def cuda_host_register(ptr: int, nbytes: int) -> bool:
    """Page-lock [ptr, ptr + nbytes) for the GPU's copy engines; False if the driver refuses.
    Portable (flag 1): pinned for every context, whichever device the loader thread has current."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1)) == 0


@dataclass(eq=False)
class _Chunk:
    buffer: Tensor  # 1-D, starting at a multiple of piece_bytes in the address space
    spans: SpanAllocator  # over the pinned prefix [0, pinned) only
    numel: int
    raw: Tensor = field(repr=False)  # the allocation `buffer` is an aligned view of

    @property
    def pinned(self) -> int:
        return self.spans.capacity


class HostArena:
    """Images (1-D views) of `dtype` elements in chunks of at least `chunk_bytes`, at most
    `limit_bytes` of them pinned (on CPU engines `pin=False`: nothing is pinned, the arena only
    reuses memory)."""

    def __init__(self, dtype: torch.dtype, limit_bytes: int, chunk_bytes: int, pin: bool,
                 piece_bytes: int = PIECE_BYTES, pause_s: float = PAUSE_S, register=None):
        """register(ptr, nbytes) -> bool page-locks a piece (default: cuda_host_register)."""
        self.dtype, self.pin, self.pause_s = dtype, pin, pause_s
        self.register = register if register is not None else cuda_host_register
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        if piece_bytes <= 0 or piece_bytes % (UNIT * self.itemsize):
            raise ValueError(f"piece_bytes must be a positive multiple of {UNIT * self.itemsize}, got {piece_bytes}")
        self.piece = piece_bytes // self.itemsize  # elements
        self.chunk = max(self.piece, -(-chunk_bytes // piece_bytes) * self.piece)
        self.limit = limit_bytes // self.itemsize
        self.chunks: list[_Chunk] = []
        self.lock = threading.Lock()
        self.returned: deque[tuple[_Chunk, int, int]] = deque()  # (chunk, start, numel) freed, not yet taken back
        self.pin_seconds = 0.0  # in the driver's page-locking calls
        self.unpinned_images = 0  # images that got pageable memory (no room within the limit, or pinning refused)
        self.used = 0  # elements of live images
        self.refused = False  # the driver refused to pin: no more growth

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked so far (pin=True), or the chunks' used prefixes (pin=False)."""
        return sum(c.pinned for c in self.chunks) * self.itemsize

    @property
    def used_bytes(self) -> int:
        return self.used * self.itemsize

    def allocate(self, numel: int) -> Tensor | None:
        """A view of `numel` elements (contents undefined), or None when the arena cannot hold
        it within its limit: the caller then uses pageable memory."""
        size = -(-max(numel, 1) // UNIT) * UNIT  # what the spans count; `release` rounds alike
        with self.lock:
            self._take_back()
            for chunk in self.chunks:
                start = chunk.spans.allocate(size)
                if start is not None:
                    return self._view(chunk, start, size)[:numel]
            chunk = None if self.refused else self._growable(size)
            if chunk is None or not self._grow(chunk, size - chunk.spans.free_at_top):
                self.unpinned_images += 1
                return None
            return self._view(chunk, chunk.spans.allocate(size), size)[:numel]

    def release(self, view: Tensor) -> bool:
        """Give an image from `allocate` back (the caller knows no copy still reads it); False
        (and nothing done) if the arena did not hand it out."""
        ptr = view.data_ptr()
        for chunk in self.chunks:
            base = chunk.buffer.data_ptr()
            if base <= ptr < base + chunk.numel * self.itemsize:
                numel = -(-view.numel() // UNIT) * UNIT
                self.returned.append((chunk, (ptr - base) // self.itemsize, numel))
                return True
        return False

    def _take_back(self) -> None:
        while self.returned:
            chunk, start, numel = self.returned.popleft()
            chunk.spans.release(start, numel)
            self.used -= numel

    def _view(self, chunk: _Chunk, start: int, numel: int) -> Tensor:
        self.used += numel
        return chunk.buffer[start:start + numel]

    def _growable(self, numel: int) -> _Chunk | None:
        """A chunk whose free top plus its unpinned rest holds `numel`, within the limit; else a
        new chunk if the limit leaves room; else None."""
        pinned = sum(c.pinned for c in self.chunks)
        for chunk in self.chunks:
            need = numel - chunk.spans.free_at_top
            if need <= chunk.numel - chunk.pinned and pinned + self._rounded(need) <= self.limit:
                return chunk
        if pinned + self._rounded(numel) > self.limit:
            return None
        size = max(self.chunk, self._rounded(numel))
        raw = torch.empty(size + self.piece, dtype=self.dtype)  # reserved, not yet touched
        shift = (-raw.data_ptr() % (self.piece * self.itemsize)) // self.itemsize
        chunk = _Chunk(raw[shift:shift + size], SpanAllocator(0), size, raw)
        self.chunks.append(chunk)
        return chunk

    def _rounded(self, numel: int) -> int:
        return -(-numel // self.piece) * self.piece

    @staticmethod
    def _fault_in(piece: Tensor) -> None:
        """Touch the piece's pages here, outside the driver's lock, so that locking only pins them."""
        piece.zero_()

    def _grow(self, chunk: _Chunk, need: int) -> bool:
        """Pin `need` more elements of `chunk` (whole pieces), a piece at a time."""
        held = 0.0
        for _ in range(self._rounded(need) // self.piece):
            at = chunk.pinned
            if self.pin:
                if held:
                    time.sleep(max(self.pause_s, PAUSE_PER_HOLD * held))
                self._fault_in(chunk.buffer[at:at + self.piece])
                began = time.perf_counter()
                ok = self.register(chunk.buffer[at:].data_ptr(), self.piece * self.itemsize)
                held = time.perf_counter() - began
                self.pin_seconds += held
                if not ok:
                    log.warning("the driver refused to page-lock host memory for adapters (%.1f GiB locked "
                                "so far): adapter images that do not fit in it use pageable memory, their "
                                "loads into the GPU are slower", self.pinned_bytes / 2**30)
                    self.refused = True
                    return False
            chunk.spans.grow(self.piece)
        return True

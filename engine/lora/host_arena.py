"""Pinned host memory for the host tier's adapter images, pinned a piece at a time and kept.

Why not `torch.empty(..., pin_memory=True)` per image: torch's pinned allocator asks the driver
for every block it has not cached (cudaHostAlloc), and page-locking holds a lock of the NVIDIA
driver while it pins, which other threads' CUDA calls (the step loop's graph launches, input
copies, event queries) wait for: a 280 MiB image, 512 MiB as that allocator rounds it up to a
power of two, stopped a CUDA-graph loop on the H200 for ~0.26 s, where this arena's longest
iteration was 6.3 ms (benchmarks/bench_host_pinning.py; RESULTS.md, Floods). The rounding also
pins up to twice an image's bytes, and blocks cached in one size class serve no other, so pinned
memory grows past the tier's byte bound as adapter sizes mix.

Here images live in chunks of ordinary (pageable) memory reserved as needed; a chunk is
page-locked from its bottom up, `piece_bytes` at a time (cudaHostRegister), only as far as
images have needed. A piece's pages are faulted in before the driver is called, so its lock is
held only to pin them, and no loader pins the next piece before twice as long as the driver held
the last one has passed, waiting without the arena's lock: the step loop's calls get the driver
for at least two thirds of the time, and another loader whose image fits in what is pinned is
not held up. Pinned bytes
are kept for the next images (a freed span is reused, first fit, as the device heap does:
engine.lora.spans), so once the tier has filled nothing is pinned again; they never exceed
`limit_bytes`. An image that finds no room within the limit (or whose pinning the driver
refuses) gets pageable memory: its slot copies are then synchronous, staged by the driver, and
still correct. Pieces start at multiples of `piece_bytes` in the address space, so a copy that
is split at those multiples (SlotPools.align_bytes) never reads across two registrations.
`close` (or a chunk's collection) unregisters the pieces.

Threads: `allocate` runs on the loader threads (the lock is held while a piece is pinned, not
while they pause; the pause after a piece holds for every loader, and a loader growing a chunk's
top for its image keeps the others off that top); `release` runs on the step thread and never
waits for that lock (it queues the span, the next `allocate` takes it back).
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter, sleep

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
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(ptr, nbytes, 1)) == 0:
        return True
    cudart.cudaGetLastError()  # the refusal is handled here: no later check on this thread sees it
    return False


def cuda_host_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


@dataclass(eq=False)
class _Chunk:
    buffer: Tensor  # 1-D, starting at a multiple of piece_bytes in the address space
    spans: SpanAllocator  # over the prefix [0, capacity) taken into use (pinned, when pinning)
    numel: int
    raw: Tensor = field(repr=False)  # the allocation `buffer` is an aligned view of
    pieces: list[int] = field(default_factory=list)  # addresses of its registered pieces
    grower: int | None = None  # the loader thread pinning its top for an image, if any

    @property
    def held(self) -> int:
        return self.spans.capacity


class HostArena:
    """Images (1-D views) of `dtype` elements in chunks of at least `chunk_bytes`, at most
    `limit_bytes` of them held (page-locked where `pin`; a CPU engine pins nothing, and the arena
    only reuses memory there)."""

    def __init__(self, dtype: torch.dtype, limit_bytes: int, chunk_bytes: int, pin: bool,
                 piece_bytes: int = PIECE_BYTES, pause_s: float = PAUSE_S, register=None, unregister=None,
                 device: torch.device | None = None):
        """register(ptr, nbytes) -> bool page-locks a piece, unregister(ptr) undoes it (default:
        the CUDA runtime's, on `device`)."""
        self.dtype, self.pin, self.pause_s, self.device = dtype, pin, pause_s, device
        self.register = register if register is not None else cuda_host_register
        self.unregister = unregister if unregister is not None else cuda_host_unregister
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        if piece_bytes <= 0 or piece_bytes % (UNIT * self.itemsize):
            raise ValueError(f"piece_bytes must be a positive multiple of {UNIT * self.itemsize}, got {piece_bytes}")
        self.piece_bytes = piece_bytes
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
        self.closed = False
        self.next_pin_at = 0.0  # perf_counter time before which no loader pins another piece

    @property
    def held_bytes(self) -> int:
        """Bytes of the chunks taken into use (what images have needed so far, kept)."""
        return sum(c.held for c in self.chunks) * self.itemsize

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked (0 where nothing is pinned)."""
        return self.held_bytes if self.pin else 0

    @property
    def used_bytes(self) -> int:
        return self.used * self.itemsize

    def allocate(self, numel: int) -> Tensor | None:
        """A view of `numel` elements (contents undefined), or None when the arena cannot hold
        it within its limit (or is closed): the caller then uses pageable memory."""
        size = -(-max(numel, 1) // UNIT) * UNIT  # what the spans count; `release` rounds alike
        me, wait = threading.get_ident(), 0.0
        try:
            while True:
                if wait:  # without the lock: the step loop's turn at the driver, other loaders' allocations
                    sleep(wait)
                with self.lock:
                    self._take_back()
                    for chunk in self.chunks:  # not from the top another loader is growing for its image
                        below = None if chunk.grower in (None, me) else chunk.held - chunk.spans.free_at_top
                        start = chunk.spans.allocate(size, below=below)
                        if start is not None:
                            self.used += size
                            return chunk.buffer[start:start + numel]
                    chunk = None if self.refused or self.closed else self._growable(size, me)
                    if chunk is None:
                        self.unpinned_images += 1
                        return None
                    wait = self.next_pin_at - perf_counter() if self.pin else 0.0
                    if wait > 0:  # every loader keeps the pause after the last piece pinned
                        continue
                    wait = 0.0
                    chunk.grower = me
                    if not self._grow(chunk, size - chunk.spans.free_at_top):
                        self.unpinned_images += 1
                        return None
        finally:
            with self.lock:
                for chunk in self.chunks:
                    if chunk.grower == me:
                        chunk.grower = None

    def release(self, view: Tensor) -> bool:
        """Give an image from `allocate` back (the caller knows no copy still reads it); False
        (and nothing done) if the arena did not hand it out."""
        ptr = view.data_ptr()
        for chunk in list(self.chunks):
            base = chunk.buffer.data_ptr()
            if base <= ptr < base + chunk.numel * self.itemsize:
                self.returned.append((chunk, (ptr - base) // self.itemsize, -(-max(view.numel(), 1) // UNIT) * UNIT))
                return True
        return False

    def close(self) -> None:
        """Unregister every piece (no copy may still read them) and forget the chunks; a later
        `allocate` (a load still running) gets None."""
        with self.lock:
            self.closed = True
            for chunk in self.chunks:
                _unregister_all(self.unregister, chunk.pieces)
            self.chunks = []

    def _take_back(self) -> None:
        while self.returned:
            chunk, start, numel = self.returned.popleft()
            chunk.spans.release(start, numel)
            self.used -= numel

    def _growable(self, numel: int, me: int) -> _Chunk | None:
        """A chunk (not one another loader is growing) whose free top plus its untouched rest
        holds `numel`, within the limit; else a new chunk if the limit leaves room; else None."""
        held = sum(c.held for c in self.chunks)
        # the chunk this loader is growing first: switching to another that a finished loader freed
        # would leave the pieces it pinned so far unused by its image, pinning more than it needs
        for chunk in sorted(self.chunks, key=lambda c: c.grower != me):
            need = numel - chunk.spans.free_at_top
            if chunk.grower in (None, me) and need <= chunk.numel - chunk.held and \
                    held + self._rounded(need) <= self.limit:
                return chunk
        if held + self._rounded(numel) > self.limit:
            return None
        size = max(self.chunk, self._rounded(numel))
        try:
            raw = torch.empty(size + self.piece, dtype=self.dtype)  # reserved, not yet touched
        except RuntimeError as exc:  # the system refuses the reservation: this image goes pageable
            log.warning("cannot reserve %.1f GiB of host memory for adapter images: %s", size * self.itemsize / 2**30,
                        exc)
            return None
        shift = (-raw.data_ptr() % self.piece_bytes) // self.itemsize
        chunk = _Chunk(raw[shift:shift + size], SpanAllocator(0), size, raw)
        # a chunk dropped without close() unregisters its pieces before its memory goes back (not
        # at interpreter exit: the process's end unpins everything, and CUDA may be gone by then;
        # nor after copies from it: whoever drops it must have waited for those)
        weakref.finalize(raw, _unregister_all, self.unregister, chunk.pieces).atexit = False
        self.chunks.append(chunk)
        return chunk

    def _rounded(self, numel: int) -> int:
        return -(-numel // self.piece) * self.piece

    @staticmethod
    def _fault_in(piece: Tensor) -> None:
        """Touch the piece's pages here, outside the driver's lock, so that locking only pins them."""
        piece.zero_()

    def _grow(self, chunk: _Chunk, need: int) -> bool:
        """Take `need` more elements of `chunk` into use, in whole pieces: without pinning, all at
        once; pinning, one piece (the caller loops), then the next piece waits twice as long as
        the driver held its lock. False when the driver refused (or the pages could not be had)."""
        if not self.pin:
            chunk.spans.grow(self._rounded(need))
            return True
        at = chunk.held
        ptr = chunk.buffer[at:].data_ptr()
        try:
            self._fault_in(chunk.buffer[at:at + self.piece])
            began = perf_counter()
            if self.device is not None and self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    ok = self.register(ptr, self.piece_bytes)
            else:
                ok = self.register(ptr, self.piece_bytes)
            held = perf_counter() - began
        except RuntimeError as exc:
            log.warning("page-locking host memory for an adapter image failed: %s; it uses pageable memory", exc)
            return False
        self.pin_seconds += held
        self.next_pin_at = perf_counter() + max(self.pause_s, PAUSE_PER_HOLD * held)
        if not ok:
            log.warning("the driver refused to page-lock host memory for adapters (%.1f GiB locked so far): "
                        "adapter images that do not fit in it use pageable memory, their loads into the GPU "
                        "are slower", self.pinned_bytes / 2**30)
            self.refused = True
            if chunk.held == 0:  # nothing of it in use: drop its reservation
                self.chunks.remove(chunk)
            return False
        chunk.pieces.append(ptr)
        chunk.spans.grow(self.piece)
        return True


def _unregister_all(unregister, pieces: list[int]) -> None:
    while pieces:
        unregister(pieces.pop())

"""Device pools of adapters: a table of offsets per slot over one buffer, laid out by bytes (a heap,
lora_layout="bytes", this module) or by slots (a max-rank image per slot: engine.lora.padded).

An adapter is resident at its own rank on its own target modules: its image holds, for each
projection it adapts and nothing else, that projection's A and B. Two orientations, each chosen
for how the kernels read it:
- An MoE layer's expert factors are laid out as a padded slot's, at r16 = the adapter's rank
  there rounded up to 16 (kernels.weights.RANK_UNIT): gate/up A [E, 2*r16, D] (gate's rows, then
  up's, in each expert's block), gate/up B [E, 2I, r16], down A [E, r16, I], down B [E, D, r16],
  rows and columns past the rank zero. Each (adapter, expert) matrix is then one contiguous
  block with its ranks contiguous and 16-aligned, what the decode kernels stream best (a
  program per routed row reads one expert's A rows and B columns). The strides that step over
  the rank are multiples of the slot's r16, which the kernels derive from its rank
  (Factor.ranked), so one table of offsets per slot still serves adapters of every rank. A
  rank-16 adapter's expert block is byte for byte a padded slot's. Ranks round up to
  EngineConfig.lora_rank_unit, 8 by default: a rank-8 adapter's experts take r16 = 8, half the
  bytes of unit 16, and the kernels, knowing the strides as multiples of 8 only, run decode steps
  as fast (RESULTS.md, the multi-tenant trace); an attention-only adapter takes no expert bytes.
  A shared-outer adapter (one gate/up A and one
  down B for all experts of a layer) keeps those halves once, [1, 2*r16, D] and [1, D, r16]: its
  slot's entry in those factors' rank tables is negated, which the kernels read as expert stride
  0 (Factor.ranked's SHAREABLE bit). On Qwen3-30B-A3B shapes that is 28% of a per-expert
  adapter's expert bytes at the same rank, so 3.6 times as many fit. Above decode size their
  gate/up shrink and down expand run once a token (kernels.moe.launch.SharedTokens; `pack` turns
  MoELoRAWeights.shared_halves on for the layers such an adapter adapts). Their decode rows still
  shrink per (token, expert): a program per routed row has nobody to share a shrink with inside
  one launch, the repeated reads of the one A come from L2, and a per-token shrink would cost a
  launch a layer more than the few MACs it saves. The layout it replaced, rank-major factors (A
  [r, E, D], B transposed [r, E, OUT]: strides of the model only), made a decode step slower than
  the padded slots (H200, 48 layers, 16 rank-16 adapters at batch 64: 23.9 against 21.3 ms,
  RESULTS.md): the row kernel's loop over B's ranks read one plane per rank.
- Attention (dense) factors stay rank-major, A [r, IN] and B transposed [r, OUT]: one expert, so
  their strides depend on the model only and slot s needs only where its image starts.
Rank buckets would cap every adapter at its bucket's rank and split the kernels' launches by
bucket; pages of a fixed rank would cut one adapter's expert block over pages and need a table
per rank row. The image is one contiguous span of the heap, so a load stays one copy of a
pinned host image (the host tier holds the same compact image).

Slots are table columns: S of them bound the adapters resident at once, the heap's bytes bound
what they hold together (engine.lora.manager evicts by LRU until an image fits). Every factor
starts 16-element aligned and the tables count in 16-element units, so the kernels know it at
compile time and vectorise their loads (kernels.weights.OFFSET_UNIT). With the experts so laid
out, a decode step took 20.95 ms against the padded slots' 21.07 (H200, same shapes; RESULTS.md),
so the heap is the default; "slots" (engine.lora.padded) remains for one max-rank image per slot.

S = slots, R = max rank, E = experts, D = hidden, I = expert intermediate, P = pools.
"""

from collections import deque
from contextlib import contextmanager

import torch
from torch import Tensor

import kernels
from engine.errors import AdapterLoadError
from engine.lora import padded
from engine.lora.adapter import LoRAAdapter
from engine.lora.host_arena import HostArena
from engine.models.layers import SparseMoE
from engine.models.moe_lm import MoECausalLM
from kernels.weights import OFFSET_UNIT, PLAIN, RANK_UNIT, RANK_UNIT_8, RANK_UNITS, RANKED_COLS, RANKED_ROWS, SHAREABLE, Factor, r16

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYOUTS = ("slots", "bytes")
QKV = ("q_proj", "k_proj", "v_proj")

# a plan entry: ("dense", (layer, name), (OUT, IN)) or ("moe", layer, (E, I, D))
PlanEntry = tuple[str, object, tuple[int, ...]]


class SlotPools:
    """The heap `storage` [capacity] of adapter images, `offsets` [F, S] (where factor row f of
    slot s begins) and `ranks` [P (+ 2 per MoE layer in the heap), S]: each plan entry's rank,
    then in the heap each MoE layer's gate/up A and down B rank tables (`shared_rows`), negated
    where the adapter's experts share that half; `write` places one packed image (side stream on
    CUDA)."""

    def __init__(self, model: MoECausalLM, num_slots: int, max_rank: int, capacity_bytes: int | None = None,
                 layout: str = "bytes", storage: Tensor | None = None, rank_unit: int = RANK_UNIT):
        """layout: "bytes" (this module's heap) or "slots" (engine.lora.padded: a max-rank image
        per slot, row s of the storage; capacity_bytes must then be None). storage: a buffer the
        heap shares with the KV cache (the heap its first capacity_bytes, then what it borrows:
        engine.lora.manager), instead of one of its own. rank_unit: what the heap rounds an
        adapter's expert rank up to (16, or 8: a rank-8 adapter's experts take half the bytes)."""
        if layout not in LAYOUTS or (layout == "slots" and capacity_bytes is not None):
            raise ValueError(f"layout must be one of {LAYOUTS} (\"slots\" without capacity_bytes), got {layout!r}")
        if rank_unit not in RANK_UNITS or (layout == "slots" and rank_unit != RANK_UNIT):
            raise ValueError(f"rank_unit must be one of {RANK_UNITS} ({RANK_UNIT} with layout \"slots\"), got {rank_unit}")
        self.num_slots, self.max_rank, self.layout, self.rank_unit = num_slots, max_rank, layout, rank_unit
        self.device = model.embed_tokens.device
        self.dtype = model.embed_tokens.dtype
        self.plan: list[PlanEntry] = []
        for i, layer in enumerate(model.layers):
            for name in ATTENTION_PROJECTIONS:
                self.plan.append(("dense", (i, name), tuple(getattr(layer.self_attn, name).weight.shape)))
            if isinstance(layer.mlp, SparseMoE):
                e, two_i, d = layer.mlp.w_gate_up.shape
                self.plan.append(("moe", i, (e, two_i // 2, d)))
        self.rows = self._factor_rows()
        moe_entries = [p for p, (kind, _, _) in enumerate(self.plan) if kind == "moe"]
        # the heap's rank tables of the shareable halves (gate/up A, down B), after the plan's
        self.shared_rows = {p: (len(self.plan) + 2 * m, len(self.plan) + 2 * m + 1)
                            for m, p in enumerate(moe_entries)} if layout == "bytes" else {}
        full = [max_rank] * len(self.plan)
        self.max_image_numel = _image_numel(self._image_layout(full, {})) if layout == "bytes" else \
            padded.slot_numel(self.plan, max_rank)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        capacity = capacity_bytes // itemsize if capacity_bytes is not None else num_slots * self.max_image_numel
        if storage is not None and (layout != "bytes" or capacity % OFFSET_UNIT or storage.numel() < capacity):
            raise ValueError(f"a shared buffer holds a heap of whole offset units ({capacity} elements of "
                             f"{storage.numel()})")
        self.heap_numel = capacity  # the heap's own elements, from the bottom of storage
        self.storage = storage if storage is not None else torch.zeros(capacity, dtype=self.dtype, device=self.device)
        # [F, S]: where factor row f of slot s begins (the heap's; padded slots have their strides)
        self.offsets = torch.zeros(len(self.rows), num_slots, dtype=torch.int64, device=self.device) \
            if layout == "bytes" else None
        num_tables = len(self.plan) + 2 * len(self.shared_rows)
        self.ranks = torch.zeros(num_tables, num_slots, dtype=torch.int32, device=self.device)
        if layout == "bytes":
            self.dense, self.moe, self.qkv = self._weights()
        else:
            self.dense, self.moe, self.qkv = padded.carve(self.plan, self._slot_rows(), self.ranks, max_rank)
        for i, layer in enumerate(model.layers):
            layer.self_attn.qkv_lora = self.qkv[i]
            layer.self_attn.o_proj.lora = self.dense[(i, "o_proj")]
            if i in self.moe:
                layer.mlp.lora = self.moe[i]
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    can_move = True  # `move` keeps every slot's images valid (engine.parallel.pools' ranks cannot)
    packs_into_arena = True  # `pack` takes the host tier's arena (engine.lora.host_arena)
    # A slot write goes to the device in pieces of this many bytes, at most COPY_DEPTH of them
    # queued at once. Host-to-device copies of every stream share the copy engine, and a small one
    # queued behind a large one waits for all of it: a step's inputs (a few KiB, on the compute
    # stream) behind a 6 GiB image would wait its ~120 ms at PCIe speed, and the step with them. On
    # the H200 the compute stream sat idle for ~93% of the time slot copies ran (RESULTS.md, the
    # multi-tenant trace's profile). A piece of 8 MiB takes ~0.15 ms at 55 GB/s; two in flight
    # keep the link busy while the copier thread waits on the older one. 0: one copy per image
    # (still split where a pinning host arena's pieces meet: align_bytes).
    copy_chunk_bytes = 8 << 20
    COPY_DEPTH = 2
    # copies also split at host addresses that are multiples of this (a pinning host arena's
    # piece: engine.lora.host_arena); 0: no such split
    align_bytes = 0
    MOVE_CHUNK = 1 << 24  # elements a step of an overlapping move goes through its bounce buffer

    @torch.no_grad()
    def move(self, slot: int, old: int, new: int, numel: int) -> None:
        """Slide slot `slot`'s image from heap element `old` down to `new` < old, and its offsets
        with it, on the current stream (ordered after the steps already issued, before the next).
        Where source and destination overlap, the image goes low to high through a bounce buffer
        a chunk at a time: a chunk's destination then covers only source already read. Padded
        slots never move: each keeps its row, whatever span the manager counts for it."""
        if self.layout == "slots" or new == old:
            return
        if not 0 <= new < old or old % OFFSET_UNIT or new % OFFSET_UNIT:
            raise ValueError(f"a move goes down between whole offset units, got {old} -> {new}")
        src, dst = self.storage[old:old + numel], self.storage[new:new + numel]
        shift = old - new
        if shift >= min(numel, self.MOVE_CHUNK):  # chunks of the shift never overlap their source
            for at in range(0, numel, shift):
                dst[at:at + shift].copy_(src[at:at + shift])
        else:
            chunk = min(numel, self.MOVE_CHUNK)
            bounce = torch.empty(chunk, dtype=self.storage.dtype, device=self.device)
            for at in range(0, numel, chunk):
                n = min(chunk, numel - at)
                bounce[:n].copy_(src[at:at + n])
                dst[at:at + n].copy_(bounce[:n])
        self.offsets[:, slot].sub_(shift // OFFSET_UNIT)

    def order_after(self, event: "torch.cuda.Event") -> None:
        """Order the current stream after one slot write (its event, from `write`)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    @property
    def capacity_bytes(self) -> int:
        """The heap's own bytes (not counting KV blocks it may borrow from a shared buffer)."""
        return self.heap_numel * self.storage.element_size()

    @property
    def slot_bytes(self) -> int:
        """Bytes of the largest image: an adapter of max rank on every target."""
        return self.max_image_numel * self.storage.element_size()

    def _factor_rows(self) -> dict[tuple, int]:
        """Row of `offsets` of each (plan entry, factor, split): a MoE layer's gate and up A,
        gate_up B, down A and B; a q/k/v group's three A and one B (at the q entry); o's A, B."""
        keys: list[tuple] = []
        for p, (kind, key, _) in enumerate(self.plan):
            if kind == "moe":
                keys += [(p, "gate_up_a", 0), (p, "gate_up_a", 1), (p, "gate_up_b"), (p, "down_a"), (p, "down_b")]
            elif key[1] == "q_proj":
                keys += [(p, "qkv_a", h) for h in range(3)] + [(p, "qkv_b")]
            elif key[1] == "o_proj":
                keys += [(p, "a"), (p, "b")]
        return {k: f for f, k in enumerate(keys)}

    def _image_layout(self, ranks: list[int], shared: dict[int, tuple[bool, bool]]) -> dict[tuple, tuple[int, int]]:
        """(start, numel) in an image of each factor row, for per-entry ranks [P] (0: absent) and
        the MoE entries whose gate/up A, down B every expert shares (`_shared_halves`)."""
        layout, at = {}, 0
        for p, (kind, key, dims) in enumerate(self.plan):
            if kind == "moe":
                e, i, d = dims
                r = r16(ranks[p], self.rank_unit)
                a_shared, b_shared = shared.get(p, (False, False))
                parts = [((p, "gate_up_a", 0), (1 if a_shared else e) * 2 * r * d), ((p, "gate_up_b"), e * 2 * i * r),
                         ((p, "down_a"), e * r * i), ((p, "down_b"), (1 if b_shared else e) * d * r)]
            elif key[1] == "q_proj":
                parts = [((p, "qkv_a", h), ranks[p + h] * dims[1]) for h in range(3)]
                parts.append(((p, "qkv_b"), max(ranks[p:p + 3]) * sum(self.plan[p + h][2][0] for h in range(3))))
            elif key[1] == "o_proj":
                parts = [((p, "a"), ranks[p] * dims[1]), ((p, "b"), ranks[p] * dims[0])]
            else:
                parts = []
            for row, n in parts:
                layout[row] = (at, n)
                at += -(-n // OFFSET_UNIT) * OFFSET_UNIT  # every factor 16-aligned (Factor.offset_unit)
            if kind == "moe":  # up's A: r16 rows into each expert's [2 * r16, D] block of A
                layout[(p, "gate_up_a", 1)] = (layout[(p, "gate_up_a", 0)][0] + r16(ranks[p], self.rank_unit) * dims[2], 0)
        return layout

    def _factor(self, first_row: int, num_rows: int, strides: tuple[int, int, int], split_rows: int,
                shape: tuple[int, int, int, int], ranks: Tensor | None = None, ranked: int = PLAIN) -> Factor:
        return Factor(self.storage, self.offsets[first_row:first_row + num_rows], *strides, split_rows,
                      (self.num_slots, *shape), offset_unit=OFFSET_UNIT, ranked=ranked, ranks=ranks)

    def _weights(self) -> tuple[dict, dict, dict]:
        """The kernels' pools over the heap: o by (layer, name), MoE by layer, q/k/v groups by layer."""
        dense, moe, groups, r = {}, {}, {}, self.max_rank
        unit = RANK_UNIT_8 if self.rank_unit == 8 else 0  # a compile-time bit of the expert factors
        for p, (kind, key, dims) in enumerate(self.plan):
            if kind == "moe":  # strides in r16s where they step over the rank (Factor.ranked)
                e, i, d = dims
                f = lambda name: self.rows[(p, name)]  # noqa: E731
                ranks = self.ranks[p]
                a_ranks, b_ranks = (self.ranks[row] for row in self.shared_rows[p])
                moe[key] = kernels.MoELoRAWeights(
                    self._factor(self.rows[(p, "gate_up_a", 0)], 2, (2 * d, d, 1), 0, (e, 2 * r, d), a_ranks,
                                 RANKED_ROWS | SHAREABLE | unit),
                    self._factor(f("gate_up_b"), 1, (2 * i, 1, 1), i, (e, 2 * i, r), ranks, RANKED_COLS | unit),
                    self._factor(f("down_a"), 1, (i, i, 1), 0, (e, r, i), ranks, RANKED_ROWS | unit),
                    self._factor(f("down_b"), 1, (d, 1, 1), d, (e, d, r), b_ranks, RANKED_COLS | SHAREABLE | unit),
                    ranks)
            elif key[1] == "q_proj":
                sections = tuple(self.plan[p + h][2][0] for h in range(3))
                n_in, n = dims[1], sum(sections)
                a = self._factor(self.rows[(p, "qkv_a", 0)], 3, (0, n_in, 1), 0, (1, 3 * r, n_in))
                b = self._factor(self.rows[(p, "qkv_b")], 1, (0, 1, n), 0, (1, n, r))
                groups[key[0]] = kernels.DenseLoRAGroup(a, b, self.ranks[p:p + 3], sections)
            elif key[1] == "o_proj":
                out_f, in_f = dims
                dense[key] = kernels.DenseLoRAWeights(
                    self._factor(self.rows[(p, "a")], 1, (0, in_f, 1), r, (1, r, in_f)),
                    self._factor(self.rows[(p, "b")], 1, (0, 1, out_f), out_f, (1, out_f, r)), self.ranks[p])
        return dense, moe, groups

    @torch.no_grad()
    def pack(self, adapter: LoRAAdapter, arena: HostArena | None = None) -> LoRAAdapter:
        """Build `adapter`'s image once: one host buffer of its own bytes (`_host_image`: from
        `arena` when given), its ranks [P] int32 and where each factor row starts in it [F]
        int64. The unpacked factors are dropped. Returns the same adapter."""
        if adapter.packed is not None:
            return adapter
        missing = self.unsupported_targets(adapter)
        if missing:
            raise AdapterLoadError(f"adapter {adapter.name!r} targets modules this engine cannot adapt: "
                                   f"{missing[:4]}")
        if self.layout == "slots":
            return self._pack_padded(adapter, arena)
        ranks, shared = self._entry_ranks(adapter), self._shared_halves(adapter)
        for p, halves in shared.items():
            if any(halves):  # from now on that layer's split path shrinks (or expands) such slots once a token
                self.moe[self.plan[p][1]].shared_halves = True
        layout = self._image_layout(ranks, shared)
        # the small tables: pinned by torch only without an arena (with one, no driver call at
        # all: a copy of a few hundred bytes from pageable memory costs microseconds)
        pin = self.device.type == "cuda" and arena is None
        image = self._host_image(_image_numel(layout), arena)
        with _returned_on_failure(image, arena):
            offsets = torch.zeros(len(self.rows), dtype=torch.int64, pin_memory=pin)
            for row, (start, _) in layout.items():
                offsets[self.rows[row]] = start // OFFSET_UNIT
            _fill(self.plan, layout, image, adapter, ranks, shared, self.rank_unit)
            tables = list(ranks)
            for p in self.shared_rows:  # the shareable halves' rank tables: negated where shared
                tables += [-ranks[p] if half else ranks[p] for half in shared.get(p, (False, False))]
            packed_ranks = torch.tensor(tables, dtype=torch.int32)
            packed_ranks = packed_ranks.pin_memory() if pin else packed_ranks
        adapter.packed, adapter.packed_offsets, adapter.packed_ranks = image, offsets, packed_ranks
        adapter.dense, adapter.moe = {}, {}
        return adapter

    def _pack_padded(self, adapter: LoRAAdapter, arena: HostArena | None) -> LoRAAdapter:
        """The padded layout's image: a whole slot row, zeros beyond each module's rank."""
        pin = self.device.type == "cuda" and arena is None  # as in `pack`
        image = self._host_image(self.max_image_numel, arena).view(1, -1)
        with _returned_on_failure(image, arena):
            ranks = torch.zeros(len(self.plan), 1, dtype=torch.int32, pin_memory=pin)
            dense, moe, _ = padded.carve(self.plan, image, ranks, self.max_rank)
            padded.fill(dense, moe, adapter, self.max_rank)
        adapter.packed, adapter.packed_ranks = image[0], ranks[:, 0]
        adapter.packed_offsets = torch.zeros(0, dtype=torch.int64)
        adapter.dense, adapter.moe = {}, {}
        return adapter

    def _host_image(self, numel: int, arena: HostArena | None) -> Tensor:
        """A zeroed host buffer for an image: from the host tier's arena (pinned there a piece at
        a time, engine.lora.host_arena), or pageable when the arena has no room; without an arena
        (an image packed for one write, or a replica over several GPUs), from torch's pinned
        allocator on CUDA."""
        if arena is None:
            return torch.zeros(numel, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        image = arena.allocate(numel)
        return (image if image is not None else torch.empty(numel, dtype=self.dtype)).zero_()

    def _slot_rows(self) -> Tensor:
        """The padded layout's storage as [S, slot_numel] rows."""
        return self.storage[:self.num_slots * self.max_image_numel].view(self.num_slots, self.max_image_numel)

    def _shared_halves(self, adapter: LoRAAdapter) -> dict[int, tuple[bool, bool]]:
        """For each MoE entry the adapter adapts: (its gate/up A, its down B) are one matrix for
        every expert. Gate's and up's A share one block, so both must be shared (or absent)."""
        shared = {}
        for p, (kind, key, _) in enumerate(self.plan):
            if kind != "moe":
                continue
            gate_up = [adapter.moe[(key, m)] for m in ("gate", "up") if (key, m) in adapter.moe]
            down = adapter.moe.get((key, "down"))
            shared[p] = (bool(gate_up) and all(f.shared == "A" for f in gate_up),
                         down is not None and down.shared == "B")
        return shared

    def _entry_ranks(self, adapter: LoRAAdapter) -> list[int]:
        """Rank of each plan entry: a dense projection's own; a MoE layer's largest of gate, up, down."""
        ranks = []
        for kind, key, _ in self.plan:
            if kind == "moe":
                ranks.append(max((adapter.moe[(key, m)].rank for m in ("gate", "up", "down")
                                  if (key, m) in adapter.moe), default=0))
            else:
                f = adapter.dense.get(key)
                ranks.append(f.rank if f is not None else 0)
        return ranks

    def handed_over(self) -> "torch.cuda.Event | None":
        """An event on the current (compute) stream after the work issued so far: taken when heap
        bytes go to a new image, it follows every step that may still read what they held (an
        evicted image, a freed KV block), and none issued later does. None without a side stream."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @torch.no_grad()
    def write(self, slot: int, start: int, adapter: LoRAAdapter,
              after: "torch.cuda.Event | None" = None) -> "torch.cuda.Event | None":
        """Copy the adapter's packed image to heap elements [start, start + its numel) and point
        slot `slot` at it (offsets and ranks); returns an event when on a side stream. An
        unpacked adapter (factors only) is packed into a temporary image for this copy.
        `after` (handed_over's, when the bytes were given to it) is what the copy waits for on the
        device; without it, the whole compute stream as it stands now. The copier thread starts a
        write a load or more after its reservation, when the compute stream holds steps that do
        not read those bytes: waiting for them held each write ~a decode step (copies at ~31 of
        the link's 53 GB/s during decode, benchmarks/RESULTS.md)."""
        image = adapter if adapter.packed is not None else self.pack(adapter.renamed(adapter.name))
        if self.stream is None:
            self._copy(slot, start, image)
            return None
        if after is not None:
            self.stream.wait_event(after)  # the readers of the bytes it overwrites
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            try:
                self._copy(slot, start, image)
                event = torch.cuda.Event()
                event.record(self.stream)
            except BaseException:
                # pieces already issued still read the host image: its owner may reuse that
                # memory once this raises
                self.stream.synchronize()
                raise
        return event

    def _copy(self, slot: int, start: int, adapter: LoRAAdapter) -> None:
        if self.layout == "slots":  # the slot's own row, wherever the manager counted its bytes
            self._upload(self._slot_rows()[slot], adapter.packed)
            self.ranks[:, slot].copy_(adapter.packed_ranks, non_blocking=True)
            return
        n = adapter.packed.numel()
        self._upload(self.storage[start:start + n], adapter.packed)
        column = self.offsets[:, slot]
        column.copy_(adapter.packed_offsets, non_blocking=True)
        column.add_(start // OFFSET_UNIT)  # spans start at multiples of it: images are whole units
        self.ranks[:, slot].copy_(adapter.packed_ranks, non_blocking=True)

    def _upload(self, dst: Tensor, src: Tensor) -> None:
        """dst.copy_(src) (both 1-D, src pinned on the host) in pieces of copy_chunk_bytes, at most
        COPY_DEPTH queued on the side stream at a time: this (copier) thread waits for the oldest
        piece before it issues another, so other streams' copies wait behind one piece at most.
        Pieces also end at host addresses that are multiples of `align_bytes`: the host arena pins
        in pieces so aligned, and a copy reading across two of its registrations might be staged
        by the driver as pageable memory is."""
        pieces = copy_pieces(src.data_ptr(), src.numel(), src.element_size(), self.copy_chunk_bytes,
                             self.align_bytes)
        if len(pieces) == 1:
            dst.copy_(src, non_blocking=True)
            return
        queued: deque = deque()
        for at, end in pieces:
            if len(queued) == self.COPY_DEPTH:
                queued.popleft().synchronize()  # releases the GIL while the piece lands
            dst[at:end].copy_(src[at:end], non_blocking=True)
            if self.stream is not None:
                queued.append(self.stream.record_event())

    def image_numel(self, adapter: LoRAAdapter) -> int:
        """Heap elements the adapter's image takes."""
        if self.layout == "slots":
            return self.max_image_numel
        if adapter.packed is not None:
            return adapter.packed.numel()
        return _image_numel(self._image_layout(self._entry_ranks(adapter), self._shared_halves(adapter)))

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        """Targets of `adapter` no pool holds (e.g. a dense MLP layer's projections)."""
        dense = {key for kind, key, _ in self.plan if kind == "dense"}
        missing = [f"layer {l} {m}" for (l, m) in adapter.dense if (l, m) not in dense]
        return missing + [f"layer {l} {m}" for (l, m) in adapter.moe if l not in self.moe]


def copy_pieces(ptr: int, numel: int, itemsize: int, step_bytes: int, align_bytes: int) -> list[tuple[int, int]]:
    """[start, end) element ranges covering [0, numel) of a host buffer at address `ptr`: none
    longer than `step_bytes` (0: no limit), none crossing an address multiple of `align_bytes`
    (0: none)."""
    step = step_bytes // itemsize if step_bytes > 0 else numel
    pieces, at = [], 0
    while at < numel:
        end = min(numel, at + max(step, 1))
        if align_bytes > 0:
            boundary = (ptr + at * itemsize) // align_bytes * align_bytes + align_bytes
            end = max(min(end, at + (boundary - ptr - at * itemsize) // itemsize), at + 1)
        pieces.append((at, end))
        at = end
    return pieces or [(0, 0)]


@contextmanager
def _returned_on_failure(image: Tensor, arena: HostArena | None):
    """An image whose filling fails (a factor of an unexpected shape) goes back to the arena."""
    try:
        yield
    except BaseException:
        if arena is not None:
            arena.release(image)
        raise


def _image_numel(layout: dict) -> int:
    """Elements of an image: up to its last factor's end, rounded up to whole offset units."""
    end = max((start + n for start, n in layout.values()), default=0)
    return -(-end // OFFSET_UNIT) * OFFSET_UNIT


def _fill(plan: list[PlanEntry], layout: dict, image: Tensor, adapter: LoRAAdapter, ranks: list[int],
          shared: dict[int, tuple[bool, bool]], rank_unit: int) -> None:
    """Write the adapter's factors into its image (zeros elsewhere): experts as padded slots at
    r16 (a shared half once, from expert 0), attention rank-major with B transposed."""
    def block(row, *shape):
        start, n = layout[row]
        return image[start:start + n].view(*shape)

    for p, (kind, key, dims) in enumerate(plan):
        r = ranks[p]
        if kind == "moe" and r > 0:
            e, i, d, rr = *dims, r16(r, rank_unit)
            a_shared, b_shared = shared[p]
            for h, module in enumerate(("gate", "up")):
                f = adapter.moe.get((key, module))
                if f is not None:
                    a = f.a[:1] if a_shared else f.a
                    block((p, "gate_up_a", 0), a.shape[0], 2, rr, d)[:, h, :f.rank].copy_(a)  # [E or 1, r, D]
                    block((p, "gate_up_b"), e, 2 * i, rr)[:, h * i:(h + 1) * i, :f.rank].copy_(f.b)  # [E, I, r]
            f = adapter.moe.get((key, "down"))
            if f is not None:
                b = f.b[:1] if b_shared else f.b
                block((p, "down_a"), e, rr, i)[:, :f.rank].copy_(f.a)
                block((p, "down_b"), b.shape[0], d, rr)[:, :, :f.rank].copy_(b)
        elif kind == "dense" and key[1] == "q_proj":
            outs = [plan[p + h][2][0] for h in range(3)]
            b = block((p, "qkv_b"), max(ranks[p:p + 3]), sum(outs)) if max(ranks[p:p + 3]) else None
            for h, name in enumerate(QKV):
                f = adapter.dense.get((key[0], name))
                if f is not None:
                    block((p, "qkv_a", h), f.rank, dims[1]).copy_(f.a)
                    b[:f.rank, sum(outs[:h]):sum(outs[:h + 1])].copy_(f.b.T)
        elif kind == "dense" and key[1] == "o_proj" and r > 0:
            f = adapter.dense[key]
            block((p, "a"), r, dims[1]).copy_(f.a)
            block((p, "b"), r, dims[0]).copy_(f.b.T)

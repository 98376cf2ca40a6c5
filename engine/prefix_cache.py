"""PrefixCache: KV blocks of full token blocks, kept after their sequences let go of them and
found again by what they hold, so a prompt that starts like an earlier one skips that part of
its prefill (vLLM's automatic prefix caching, sglang's radix cache). Plain Python.

A cached block's key is (its parent, its tokens). The parent of a sequence's first block is the
sequence's root: its adapter, whose deltas shape every layer's KV, and, under the "tenant"
scope (the default), its tenant. Sharing KV across tenants would let one tenant tell, from its
own time to first token, whether another sent a given prompt. Each later block's parent is the
content id the block before it got when it was cached. Keys are compared whole, so no hash
collision can hand a sequence another prefix's KV. A content id is never reused, so the blocks
that followed an evicted one can no longer be reached; they age out like any unused block.

The BlockManager owns the blocks. This keeps which of them hold what, and the order in which
the ones no sequence holds were let go (least recently first: the order they are evicted in when
the manager evicts by age).
"""
import itertools
from collections import OrderedDict

from engine.sequence import Sequence

SCOPES = ("tenant", "all")


class PrefixCache:
    def __init__(self, block_size: int, scope: str = "tenant"):
        if scope not in SCOPES:
            raise ValueError(f"prefix cache scope must be one of {SCOPES}, got {scope!r}")
        self.block_size, self.per_tenant = block_size, scope == "tenant"
        self._block_of: dict[tuple, int] = {}  # (parent, tokens) -> block
        self._entry: dict[int, tuple[tuple, int]] = {}  # block -> (its key, its content id)
        self.unused: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self._ids = itertools.count(1)
        self.queried_tokens = 0  # tokens of the sequences admitted (first admissions only)
        self.hit_tokens = 0  # of those, tokens whose KV came from the cache

    def __contains__(self, block: int) -> bool:
        return block in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def _root(self, seq: Sequence) -> tuple:
        return ("root", seq.tenant if self.per_tenant else "", seq.lora.lora_name if seq.lora else "")

    def _key(self, seq: Sequence, j: int, parent) -> tuple:
        """The key of seq's block j under `parent` (None: seq's root)."""
        tokens = tuple(seq.token_ids(j * self.block_size, (j + 1) * self.block_size))
        return (self._root(seq) if parent is None else parent), tokens

    def _matchable(self, seq: Sequence) -> int:
        """How many of seq's first blocks match may take: full blocks of known tokens short of its
        last token (a step must compute at least one token to sample from); none for a sequence
        whose every prompt position's logits are wanted (prompt logprobs)."""
        if seq.params.prompt_logprobs is not None:
            return 0
        return min(seq.num_known_tokens, seq.num_tokens - 1) // self.block_size

    def match(self, seq: Sequence) -> list[int]:
        """The blocks holding seq's longest cached prefix (of its `_matchable` blocks)."""
        parent, found = None, []
        for i in range(self._matchable(seq)):  # block by block: a miss ends the walk before the rest is read
            block = self._block_of.get(self._key(seq, i, parent))
            if block is None:
                break
            found.append(block)
            parent = self._entry[block][1]
        return found

    def next_key(self, seq: Sequence, prefix: list[int]) -> tuple | None:
        """The key of seq's block after `prefix` (match's blocks), if match could find that block
        cached once it is; else None."""
        if len(prefix) >= self._matchable(seq):
            return None
        return self._key(seq, len(prefix), self._entry[prefix[-1]][1] if prefix else None)

    def filled_key(self, seq: Sequence, num_new_tokens: int) -> tuple | None:
        """The key the first block that a step computing seq's next `num_new_tokens` fills will
        be cached under, when the host knows its tokens and the blocks before it are cached;
        else None."""
        size, j, done = self.block_size, seq.num_cached_blocks, seq.num_computed_tokens
        if j != done // size or (j + 1) * size > min(done + num_new_tokens, seq.num_known_tokens):
            return None
        return self._key(seq, j, seq.prefix_parent if j else None)

    def attached(self, seq: Sequence, prefix: list[int]) -> None:
        """seq was admitted holding `prefix` (from match): its next blocks chain from there."""
        seq.num_cached_blocks = len(prefix)
        seq.prefix_parent = self._entry[prefix[-1]][1] if prefix else None
        if seq.num_preemptions == 0:  # a recompute finding its own blocks is no hit of the workload's
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += len(prefix) * self.block_size

    def register(self, seq: Sequence) -> None:
        """Cache seq's full blocks whose KV a launched step writes (steps run in order on the
        device, so a later step that reads them finds them written) and whose tokens the host
        knows. A block whose key is cached already (two sequences computed it at once) stays
        uncached, and seq's next blocks chain from the cached one."""
        start = seq.num_cached_blocks
        end = min(min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size, len(seq.block_table))
        if end <= start:
            return
        parent = seq.prefix_parent if start else None
        for i in range(start, end):
            key = self._key(seq, i, parent)
            block = self._block_of.get(key)
            if block is None:
                block = seq.block_table[i]
                self._block_of[key] = block
                self._entry[block] = (key, next(self._ids))
            parent = self._entry[block][1]
        seq.num_cached_blocks, seq.prefix_parent = end, parent

    def forget(self, block: int) -> None:
        """The block is reused for other tokens (or lent to the adapter heap): drop what it held."""
        key, _ = self._entry.pop(block)
        del self._block_of[key]
        self.unused.pop(block, None)

    def oldest_unused(self, at_least: int = 0, within: int | None = None) -> int | None:
        """The cached block no sequence holds that was let go longest ago, of those numbered
        `at_least` or more among the first `within` let go (None: all), or None."""
        for k, block in enumerate(self.unused):
            if within is not None and k >= within:
                return None
            if block >= at_least:
                return block
        return None

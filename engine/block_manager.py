"""Paged KV blocks: two reference-counted pools and a prefix cache over both.

gpt-oss alternates full-attention layers (they need every position) with sliding-window
layers (a query at position p sees keys p - window + 1 .. p). Each kind gets its own pool
of physical blocks with the same logical numbering (block i holds positions
[i*block_size, (i+1)*block_size)). A sequence's full table grows with it; its sliding table
only has to hold blocks overlapping [context_len - window + 1, end of this step), so blocks
that fall behind the window are returned to the pool as the sequence advances.

Prefix caching. A full block (all ``block_size`` tokens computed) is keyed by the chain
hash of every token from position 0 to its end: the K/V of a position depend on all the
tokens before it, so equal chain hashes mean equal K/V (within one engine: one model, one
dtype). The same key names the block in both pools. When a sequence is admitted, it reuses
the longest run of leading blocks such that
  * every full-pool block 0..k-1 is cached (full layers attend to all of them), and
  * every sliding-pool block overlapping [k*bs - window + 1, k*bs) is cached (sliding layers
    at position k*bs attend to those and nothing earlier);
k shrinks until both hold (k = 0 always does). Sliding blocks further back are not needed,
so their table entries stay -1. Blocks whose reference count drops to zero stay findable by
their hash and are evicted least-recently-freed first, only when a fresh block is needed and
no never-hashed block is free. Cached blocks are full and never written again, so sharing
them between running sequences is safe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from .sequence import Sequence

NO_BLOCK = -1


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """128-bit key of a block given its parent's key: collisions would leak K/V between
    requests, so a cryptographic hash rather than Python's ``hash``."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockPool:
    """A fixed set of physical blocks with reference counts and an LRU of cached free blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free_uncached: deque[int] = deque(range(num_blocks))
        # Free blocks still holding a cached prefix, oldest-freed first (evicted first).
        self.evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self.free_uncached) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self.free_uncached:
            block = self.free_uncached.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            old = self.block_hash[block]
            assert old is not None
            del self.by_hash[old]
            self.block_hash[block] = None
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler should have checked)")
        self.ref_counts[block] = 1
        return block

    def lookup(self, key: bytes) -> int | None:
        return self.by_hash.get(key)

    def acquire(self, block: int) -> None:
        """Take one more reference to a cached block (reviving it if it was free)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"block {block} released more often than taken")
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free_uncached.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Publish a full, computed block under its chain hash. If another block already holds
        the same content (two identical prompts computed side by side), keep the first."""
        if key in self.by_hash or self.block_hash[block] is not None:
            return
        self.by_hash[key] = block
        self.block_hash[block] = key

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0


class KVBlockManager:
    """Which physical blocks each sequence holds, in the full and the sliding pool."""

    def __init__(
        self,
        block_size: int,
        num_full_blocks: int,
        num_sliding_blocks: int,
        sliding_window: int | None,
        enable_prefix_caching: bool,
    ) -> None:
        self.block_size = block_size
        self.full = BlockPool(num_full_blocks)
        self.sliding = BlockPool(num_sliding_blocks)
        self.window = sliding_window  # None: the model has no sliding layers
        self.enable_prefix_caching = enable_prefix_caching

    # -- geometry -------------------------------------------------------------------------
    def sliding_start(self, context_len: int) -> int:
        """First logical block a step starting at ``context_len`` needs in the sliding pool."""
        assert self.window is not None
        return max(0, context_len - self.window + 1) // self.block_size

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_used_blocks(self) -> int:
        return self.full.num_used + self.sliding.num_used

    @property
    def num_total_blocks(self) -> int:
        return self.full.num_blocks + self.sliding.num_blocks

    def all_free(self) -> bool:
        return self.full.num_free == self.full.num_blocks and self.sliding.num_free == self.sliding.num_blocks

    # -- prefix cache ---------------------------------------------------------------------
    def _ensure_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else b"", seq.token_ids[i * bs : (i + 1) * bs]))

    def lookup_prefix(self, seq: Sequence) -> int:
        """Leading blocks of a not-yet-admitted sequence servable from the cache. At least one
        token is always left to compute: the step that computes it yields the next logits."""
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        hashes = seq.block_hashes
        k = 0
        while k < max_blocks and self.full.lookup(hashes[k]) is not None:
            k += 1
        if self.window is not None:
            while k > 0 and not all(
                self.sliding.lookup(hashes[i]) is not None
                for i in range(self.sliding_start(k * self.block_size), k)
            ):
                k -= 1
        return k

    # -- allocation -----------------------------------------------------------------------
    def _holds(self, seq: Sequence, num_new: int) -> bool:
        """Whether the next ``num_new`` tokens fit in blocks ``seq`` already holds (most
        decodes). Sliding entries from the window start onwards are always held for a
        running sequence, so table lengths decide."""
        need = self._num_blocks(seq.num_computed_tokens + num_new)
        return len(seq.full_blocks) >= need and (self.window is None or len(seq.sliding_blocks) >= need)

    def _blocks_needed(self, seq: Sequence, num_new: int, hit: int) -> tuple[int, int]:
        """Free blocks (full, sliding) that scheduling ``num_new`` tokens would consume; ``hit``
        > 0 only for an unadmitted sequence reusing that many cached blocks (reviving a
        cached block that is free consumes a free block too)."""
        bs = self.block_size
        if not hit and self._holds(seq, num_new):
            return 0, 0
        if hit:
            computed = hit * bs
            keys = seq.block_hashes[:hit]
            full_revive = sum(self.full.is_free(self.full.by_hash[k]) for k in keys)
            full_have = hit
        else:
            computed = seq.num_computed_tokens
            full_revive = 0
            full_have = len(seq.full_blocks)
        need = self._num_blocks(computed + num_new)
        full = max(0, need - full_have) + full_revive
        if self.window is None:
            return full, 0
        start = self.sliding_start(computed)
        if hit:
            sliding = sum(self.sliding.is_free(self.sliding.by_hash[k]) for k in keys[start:hit])
            sliding += max(0, need - hit)
        else:
            table = seq.sliding_blocks
            sliding = sum(1 for i in range(start, need) if i >= len(table) or table[i] == NO_BLOCK)
        return full, sliding

    def can_schedule(self, seq: Sequence, num_new: int, hit: int = 0) -> bool:
        full, sliding = self._blocks_needed(seq, num_new, hit)
        return full <= self.full.num_free and sliding <= self.sliding.num_free

    def admit(self, seq: Sequence, hit: int) -> None:
        """Give an unadmitted sequence its ``hit`` cached leading blocks."""
        assert not seq.full_blocks and not seq.sliding_blocks and seq.num_computed_tokens == 0
        keys = seq.block_hashes[:hit]
        for k in keys:
            block = self.full.by_hash[k]
            self.full.acquire(block)
            seq.full_blocks.append(block)
        if self.window is not None and hit:
            start = self.sliding_start(hit * self.block_size)
            seq.sliding_blocks.extend([NO_BLOCK] * start)
            for k in keys[start:]:
                block = self.sliding.by_hash[k]
                self.sliding.acquire(block)
                seq.sliding_blocks.append(block)
        seq.num_computed_tokens = hit * self.block_size
        seq.num_registered_blocks = hit

    def grow(self, seq: Sequence, num_new: int) -> None:
        """Allocate what the next ``num_new`` tokens need (the caller checked can_schedule)."""
        if self._holds(seq, num_new):
            return
        need = self._num_blocks(seq.num_computed_tokens + num_new)
        while len(seq.full_blocks) < need:
            seq.full_blocks.append(self.full.allocate())
        if self.window is None:
            return
        table = seq.sliding_blocks
        if len(table) < need:
            table.extend([NO_BLOCK] * (need - len(table)))
        for i in range(self.sliding_start(seq.num_computed_tokens), need):
            if table[i] == NO_BLOCK:
                table[i] = self.sliding.allocate()

    def on_computed(self, seq: Sequence) -> None:
        """After a step advanced ``seq.num_computed_tokens``: publish the blocks it filled to
        the prefix cache, then return the sliding blocks that fell behind the window."""
        bs = self.block_size
        if self.enable_prefix_caching:
            num_full = seq.num_computed_tokens // bs
            if num_full > seq.num_registered_blocks:
                self._ensure_hashes(seq, num_full)
                for i in range(seq.num_registered_blocks, num_full):
                    self.full.register(seq.full_blocks[i], seq.block_hashes[i])
                    # Blocks filled since the last step are all inside the window still held.
                    if self.window is not None and seq.sliding_blocks[i] != NO_BLOCK:
                        self.sliding.register(seq.sliding_blocks[i], seq.block_hashes[i])
                seq.num_registered_blocks = num_full
        if self.window is not None:
            table = seq.sliding_blocks
            # Freed blocks always form a prefix of the table: walk back from the new start.
            i = min(self.sliding_start(seq.num_computed_tokens), len(table)) - 1
            while i >= 0 and table[i] != NO_BLOCK:
                self.sliding.release(table[i])
                table[i] = NO_BLOCK
                i -= 1

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` (finish, abort or preemption). The tail goes first so
        that, among equally old cached blocks, a chain's end is evicted before its start."""
        for block in reversed(seq.full_blocks):
            self.full.release(block)
        for block in reversed(seq.sliding_blocks):
            if block != NO_BLOCK:
                self.sliding.release(block)
        seq.full_blocks.clear()
        seq.sliding_blocks.clear()
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

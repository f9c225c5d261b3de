"""The KV block pool: reference counts, prefix cache over a hash chain, LRU eviction.

A full block is identified by the hash of (its parent block's hash, its tokens, the engine's KV
key). The KV key must name everything else that changes what the block holds (the KV format and
its scales), so a cache entry is only reused where it is valid. Unreferenced blocks wait in one
free queue: empty blocks at the front, cached ones behind them in the order they were released.
A request needing fresh blocks takes from the front, evicting the least recently used cache
entry only when no empty block is left; a later request with the same prefix takes cached blocks
back out of the queue (a hit). Every operation is O(1) per block: the queue is an OrderedDict,
so a hit removes a block from its middle without a scan.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set only while the block is the cache entry of this hash


@dataclass
class PrefixStats:
    """Prefix-cache counters in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block(parent: bytes | None, tokens: list[int], extra: bytes) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockPool:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, extra_key: bytes = b""
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching, self.extra_key = enable_caching, extra_key
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.num_cached_free = 0  # blocks in the free queue that hold a cache entry
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused ones included)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def counts(self) -> dict[str, int]:
        """free (empty) + cached (unreferenced, reusable) + in_use == total when the books are right.

        Counted from the blocks themselves, not from the running counters, so tests can check both.
        """
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        cached = sum(1 for i in self.free_queue if self.blocks[i].block_hash is not None)
        return {
            "free": self.num_free - cached,
            "cached": cached,
            "in_use": in_use,
            "total": self.num_blocks,
        }

    def allocate(self, n: int) -> list[int]:
        """n blocks from the front of the free queue, evicting the cache entries they held."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                del self.cached[blk.block_hash]
                blk.block_hash = None
                self.num_cached_free -= 1
            blk.ref_cnt = 1
            out.append(bid)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each. Released cache entries join the back of the queue, a
        request's tail blocks ahead of its head ones (a longer prefix is worth less); empty
        blocks go to the front, to be handed out before any cache entry is evicted."""
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            blk.ref_cnt -= 1
            assert blk.ref_cnt >= 0, f"block {bid} freed twice"
            if blk.ref_cnt == 0:
                self.free_queue[bid] = None
                if blk.block_hash is None:
                    self.free_queue.move_to_end(bid, last=False)
                else:
                    self.num_cached_free += 1

    def block_hashes(self, tokens: list[int], start: int, parent: bytes | None) -> list[bytes]:
        """Hashes of the full blocks of `tokens` from block index `start`, chained from parent."""
        out, bs = [], self.block_size
        for i in range(start, len(tokens) // bs):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.extra_key)
            out.append(parent)
        return out

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`; no reference is taken yet."""
        hit = []
        if self.enable_caching:
            for h in hashes:
                bid = self.cached.get(h)
                if bid is None:
                    break
                hit.append(bid)
        return hit

    def num_unreferenced(self, block_ids: list[int]) -> int:
        """How many of these blocks sit in the free queue (taking them lowers num_free)."""
        return sum(1 for bid in block_ids if self.blocks[bid].ref_cnt == 0)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on each block (cache hits), out of the free queue if it was there."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self.free_queue[bid]
                self.num_cached_free -= 1
            blk.ref_cnt += 1

    def cache_blocks(self, block_ids: list[int], hashes: list[bytes], start: int) -> None:
        """Publish full blocks [start, len(hashes)) of a request under their hashes. A block
        whose hash another block already holds (the same prefix computed twice at once) stays
        unhashed, so it is reused as an empty block first."""
        if not self.enable_caching:
            return
        for i in range(start, len(hashes)):
            blk, h = self.blocks[block_ids[i]], hashes[i]
            if blk.block_hash is None and h not in self.cached:
                blk.block_hash = h
                self.cached[h] = blk.block_id

"""The KV block pool: reference counts, prefix cache over a hash chain, LRU eviction.

A full block is identified by the hash of (its parent block's hash, its tokens, the engine's KV
key). Blocks whose requests finished keep their hash and sit in the free queue in LRU order: a
later request with the same prefix takes them back (a cache hit); a request needing fresh blocks
takes the least recently freed one and evicts its hash. Every operation is O(1) per block.
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
    block_hash: bytes | None = None


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
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused ones included)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def counts(self) -> dict[str, int]:
        """free (empty) + cached (unreferenced, reusable) + in_use == total."""
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        cached = sum(1 for i in self.free_queue if self.blocks[i].block_hash is not None)
        return {
            "free": self.num_free - cached,
            "cached": cached,
            "in_use": in_use,
            "total": self.num_blocks,
        }

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                if self.cached.get(blk.block_hash) == bid:
                    del self.cached[blk.block_hash]
                blk.block_hash = None
            blk.ref_cnt = 1
            out.append(bid)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each; tail blocks go first in the queue so they are evicted first."""
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            blk.ref_cnt -= 1
            assert blk.ref_cnt >= 0, f"block {bid} freed twice"
            if blk.ref_cnt == 0:
                self.free_queue[bid] = None

    def block_hashes(self, tokens: list[int], start: int, parent: bytes | None) -> list[bytes]:
        """Hashes of the full blocks of `tokens` from block index `start`, chained from parent."""
        out, bs = [], self.block_size
        for i in range(start, len(tokens) // bs):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.extra_key)
            out.append(parent)
        return out

    def lookup(self, hashes: list[bytes], num_tokens: int) -> list[int]:
        """Take a reference on the longest cached prefix; at least one token is left to compute."""
        if not self.enable_caching:
            return []
        hit = []
        for h in hashes[: (num_tokens - 1) // self.block_size]:
            bid = self.cached.get(h)
            if bid is None:
                break
            hit.append(bid)
        for bid in hit:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self.free_queue[bid]
            blk.ref_cnt += 1
        self.stats.queries += num_tokens
        self.stats.hits += len(hit) * self.block_size
        return hit

    def cache_blocks(self, block_ids: list[int], hashes: list[bytes], start: int) -> None:
        """Publish full blocks [start, len(hashes)) of a request under their hashes."""
        if not self.enable_caching:
            return
        for i in range(start, len(hashes)):
            blk = self.blocks[block_ids[i]]
            if blk.block_hash is None:
                blk.block_hash = hashes[i]
                self.cached.setdefault(hashes[i], blk.block_id)

"""One token budget per step: running requests first (decodes and ongoing prefill chunks), then
new requests from the queue, each taking a chunk of the remaining budget (vLLM v1's scheme).

Caps that keep one 128K prompt from starving everyone: `long_prefill_token_threshold` bounds the
chunk a single prefill takes per step, and `max_num_partial_prefills` bounds how many prompts may
be mid-prefill at once. When KV blocks run out, the newest running request is preempted and later
recomputed (its cached prefix blocks usually survive in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from longserve.config import EngineConfig
from longserve.engine.request import Request, Status
from longserve.kv.blocks import BlockPool


@dataclass
class Batch:
    """The work of one step: (request, number of new tokens to compute) pairs."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: BlockPool) -> None:
        self.cfg, self.pool = cfg, pool
        self.budget = cfg.max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed_tokens + n) // self.pool.block_size)
        return max(0, total - len(req.block_ids))

    def _chunk(self, req: Request, budget: int) -> int:
        n = req.num_tokens - req.num_computed_tokens
        thr = self.cfg.long_prefill_token_threshold
        if thr and n > 1:
            n = min(n, thr)
        if not self.cfg.enable_chunked_prefill and n > budget:
            return 0
        return min(n, budget)

    def _preempt(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids, req.num_computed_tokens = [], 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.budget
        partial = 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            if n == 0:
                i += 1
                continue
            while self._blocks_needed(req, n) > self.pool.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                req.block_ids += self.pool.allocate(self._blocks_needed(req, n))
                batch.items.append((req, n))
                budget -= n
                partial += req.num_computed_tokens + n < req.num_tokens
                i += 1
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if req.num_computed_tokens == 0 and not req.block_ids:
                self._lookup_prefix(req)
            n = self._chunk(req, budget)
            will_be_partial = req.num_computed_tokens + n < req.num_tokens
            if n == 0 or (will_be_partial and partial >= self.cfg.max_num_partial_prefills):
                break
            need = self._blocks_needed(req, n)
            if need > self.pool.num_free:
                break
            self.waiting.popleft()
            req.block_ids += self.pool.allocate(need)
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.time()
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n
            partial += will_be_partial
        return batch

    def _extend_hashes(self, req: Request, num_tokens: int) -> None:
        """Hash the full blocks of req's first num_tokens tokens not hashed yet (a chain)."""
        if num_tokens // self.pool.block_size > len(req.block_hashes):
            parent = req.block_hashes[-1] if req.block_hashes else None
            tokens = req.all_token_ids[:num_tokens]
            req.block_hashes += self.pool.block_hashes(tokens, len(req.block_hashes), parent)

    def _lookup_prefix(self, req: Request) -> None:
        """Reuse cached full blocks of the prompt (not when prompt logprobs must be computed)."""
        if not self.pool.enable_caching or (
            req.params.prompt_logprobs is not None and req.prompt_logprobs is None
        ):
            return
        self._extend_hashes(req, req.num_tokens)
        hit = self.pool.lookup(req.block_hashes, req.num_tokens)
        if hit:
            req.block_ids = hit
            req.num_computed_tokens = len(hit) * self.pool.block_size
            if req.num_preemptions == 0:
                req.num_cached_tokens = req.num_computed_tokens

    def computed(self, req: Request, n: int) -> None:
        """After a step: n more tokens of req are in the cache; publish its newly full blocks."""
        before = req.num_computed_tokens // self.pool.block_size
        req.num_computed_tokens += n
        full = req.num_computed_tokens // self.pool.block_size
        if full > before and self.pool.enable_caching:
            self._extend_hashes(req, req.num_computed_tokens)
            self.pool.cache_blocks(req.block_ids, req.block_hashes[:full], before)

    def finish(self, req: Request) -> None:
        """Release a finished or aborted request's blocks and forget it."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED

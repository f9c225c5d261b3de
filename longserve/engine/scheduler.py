"""One token budget per step (vLLM v1's scheme): running requests first, decodes ahead of
ongoing prefill chunks, then new requests from the queue, each taking a chunk of what is left.

Caps that keep one 128K prompt from starving everyone: `long_prefill_token_threshold` bounds the
chunk a single prefill takes per step, so the rest of the budget goes to others, and
`max_num_partial_prefills` bounds how many prompts may be mid-prefill at once; a prompt held
back by that cap lets the prompts behind it that finish within the step go first, and keeps its
place at the head of the queue. A waiting request holds no KV blocks (a cache hit takes its
references only when the request is admitted), so it can never block the requests that would
free them. When blocks run out, the newest running request not yet scheduled in the step is
preempted and later recomputed (its prefix blocks usually survive in the prefix cache).
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


@dataclass
class SchedulerStats:
    """A snapshot for the server's metrics and the reports; prefix-cache counters in tokens."""

    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_usage: float  # fraction of blocks referenced by requests
    blocks_free: int
    blocks_cached: int  # unreferenced blocks that still hold a reusable prefix
    blocks_in_use: int
    num_running: int
    num_waiting: int
    num_preemptions: int


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: BlockPool) -> None:
        if cfg.max_num_partial_prefills < 1:
            raise ValueError("max_num_partial_prefills must be >= 1")
        self.cfg, self.pool = cfg, pool
        self.budget = cfg.max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        p = self.pool
        return SchedulerStats(
            prefix_cache_queries=p.stats.queries,
            prefix_cache_hits=p.stats.hits,
            kv_usage=p.usage,
            blocks_free=p.num_free - p.num_cached_free,
            blocks_cached=p.num_cached_free,
            blocks_in_use=p.num_blocks - p.num_free,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
        )

    def _blocks_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed_tokens + n) // self.pool.block_size)
        return max(0, total - len(req.block_ids))

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to compute now: all that remain, or 0 when they do not fit; with chunked
        prefill, as many as the budget and long_prefill_token_threshold allow."""
        if not self.cfg.enable_chunked_prefill:
            return remaining if remaining <= budget else 0
        thr = self.cfg.long_prefill_token_threshold
        if thr > 0:
            remaining = min(remaining, thr)
        return min(remaining, budget)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids, req.num_computed_tokens = [], 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _make_room(self, req: Request, n: int, batch: Batch) -> bool:
        """Give req blocks for n more tokens, preempting the newest running requests not yet in
        the batch (req itself last). False if req was preempted."""
        while self._blocks_needed(req, n) > self.pool.num_free:
            taken = {id(r) for r, _ in batch.items}
            victim = next(r for r in reversed(self.running) if id(r) not in taken)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids += self.pool.allocate(self._blocks_needed(req, n))
        return True

    def schedule(self) -> Batch:
        batch, budget, partial = Batch(), self.budget, 0
        cap = self.cfg.max_num_partial_prefills
        # Decodes first, then ongoing prefills, each in the order they were admitted.
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted to make room earlier in this loop
                continue
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            if n == 0 or not self._make_room(req, n, batch):
                continue
            batch.items.append((req, n))
            budget -= n
            partial += req.num_computed_tokens + n < req.num_tokens
        if batch.preempted:
            return batch
        held: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting.popleft()
            hit = self._prefix_hit(req)
            start = len(hit) * self.pool.block_size
            n = self._chunk(req.num_tokens - start, budget)
            will_be_partial = start + n < req.num_tokens
            if n > 0 and will_be_partial and partial >= cap:
                held.append(req)
                continue
            need = -(-(start + n) // self.pool.block_size) - len(hit)
            if n == 0 or need + self.pool.num_unreferenced(hit) > self.pool.num_free:
                self.waiting.appendleft(req)
                break
            self.pool.touch(hit)
            req.block_ids = hit + self.pool.allocate(need)
            req.num_computed_tokens = start
            if req.num_preemptions == 0 and self._may_read_cache(req):
                req.num_cached_tokens = start
                self.pool.stats.queries += req.num_tokens
                self.pool.stats.hits += start
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.time()
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n
            partial += will_be_partial
        self.waiting.extendleft(reversed(held))
        if not batch.items and self.has_work():
            raise RuntimeError("the scheduler stalled: requests wait but none can be scheduled")
        return batch

    def _may_read_cache(self, req: Request) -> bool:
        """Not while prompt logprobs are still to be computed: they need every prompt position."""
        plp = req.prompt_logprobs
        return self.pool.enable_caching and (plp is None or len(plp) >= req.num_prompt_tokens)

    def _extend_hashes(self, req: Request, num_tokens: int) -> None:
        """Hash the full blocks of req's first num_tokens tokens not hashed yet (a chain)."""
        if num_tokens // self.pool.block_size > len(req.block_hashes):
            parent = req.block_hashes[-1] if req.block_hashes else None
            tokens = req.all_token_ids[:num_tokens]
            req.block_hashes += self.pool.block_hashes(tokens, len(req.block_hashes), parent)

    def _prefix_hit(self, req: Request) -> list[int]:
        """Cached blocks of req's longest cached prefix, leaving at least one token to compute
        (its logits give the next token); no reference is taken here."""
        if not self._may_read_cache(req):
            return []
        self._extend_hashes(req, req.num_tokens)
        return self.pool.lookup(req.block_hashes[: (req.num_tokens - 1) // self.pool.block_size])

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

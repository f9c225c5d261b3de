"""The scheduler and the block pool: chunked prefill, prefix caching, preemption, accounting.

Model tests run the embedded model in float32 and compare greedy tokens across scheduling
settings; scheduling-only tests drive the Scheduler with stand-in tokens, no model.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.config import EngineConfig
from longserve.engine.request import Request
from longserve.engine.scheduler import Batch, Scheduler
from longserve.kv.blocks import BlockPool

from .conftest import assert_no_leaks

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SUBJECTS = ["The old lighthouse", "A quiet river", "The city council", "My neighbour's dog"]
VERBS = ["watched", "remembered", "questioned", "carried", "described"]
OBJECTS = ["the autumn storm", "a forgotten letter", "the morning train", "seven silver coins"]


def text(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} on day {rng.randint(1, 999)}."
        for _ in range(n_sentences)
    )


def ids_of(llm: LLM, s: str) -> list[int]:
    return llm.get_tokenizer().encode(s)


def common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def tokens(outs) -> list[list[int]]:  # noqa: ANN001
    return [o.outputs[0].token_ids for o in outs]


def check_books(pool: BlockPool, sched: Scheduler) -> None:
    """free + cached + in use = total, the running counters agree, waiting requests hold nothing."""
    c = pool.counts()
    assert c["free"] + c["cached"] + c["in_use"] == c["total"]
    s = sched.stats()
    assert (s.blocks_free, s.blocks_cached, s.blocks_in_use) == (
        c["free"],
        c["cached"],
        c["in_use"],
    )
    assert c["in_use"] == len({b for r in sched.running for b in r.block_ids})
    assert all(not r.block_ids for r in sched.waiting)
    assert all(pool.blocks[b].block_hash == h for h, b in pool.cached.items())


@contextmanager
def scheduling(llm: LLM, num_blocks: int | None = None, **changes):
    """The fixture's engine under other scheduler settings: a fresh block pool and scheduler over
    the same model and KV storage (building an engine per setting would cost seconds each)."""
    eng = llm.engine
    saved = eng.pool, eng.scheduler
    cfg = replace(eng.cfg, **changes)
    if not cfg.enable_chunked_prefill:  # as LLMEngine does: a whole prompt fits one step
        cfg = replace(
            cfg, max_num_batched_tokens=max(cfg.max_num_batched_tokens, eng.max_model_len)
        )
    eng.pool = BlockPool(
        num_blocks or saved[0].num_blocks,
        cfg.block_size,
        cfg.enable_prefix_caching,
        saved[0].extra_key,
    )
    eng.scheduler = Scheduler(cfg, eng.pool)
    try:
        yield eng
        check_books(eng.pool, eng.scheduler)
        assert_no_leaks(llm)
    finally:
        eng.pool, eng.scheduler = saved


def record_batches(eng, monkeypatch) -> list[Batch]:  # noqa: ANN001
    batches: list[Batch] = []
    schedule = eng.scheduler.schedule

    def spy() -> Batch:
        b = schedule()
        check_books(eng.pool, eng.scheduler)
        batches.append(b)
        return b

    monkeypatch.setattr(eng.scheduler, "schedule", spy)
    return batches


# ---------------------------------------------------------------- model: same tokens every way


def test_chunked_prefill_gives_the_same_tokens(llm, monkeypatch):
    prompts = [text(n, seed=n) for n in (1, 6, 45)]
    with scheduling(llm, enable_chunked_prefill=False, enable_prefix_caching=False):
        ref = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert max(len(ids_of(llm, p)) for p in prompts) > 512
    for budget in (32, 100, 512):
        with scheduling(llm, max_num_batched_tokens=budget, enable_prefix_caching=False) as eng:
            batches = record_batches(eng, monkeypatch)
            assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == ref, budget
            assert max(b.num_tokens for b in batches) <= budget
            assert len(batches) > len(ids_of(llm, prompts[-1])) // budget, "prompts were split"


def test_steps_are_split_for_the_tma_kernels(llm, monkeypatch):
    """AttnMeta.long_queries and long_whole (how a step is split on CUDA between the TMA prefill
    kernels and paged_extend) count the sequences that bring 128 queries or more and say whether
    each is a whole prompt: a fresh prompt's first chunk, not a later chunk, a decode or a
    prefix-cache hit."""
    from longserve.models import llama

    seen = []
    attend = llama.attention

    def spy(q, cache, layer, meta, scale, k=None, v=None):  # noqa: ANN001, ANN202
        if layer == 0:
            n = [e - s for s, e in zip(meta.query_start, meta.query_start[1:], strict=False)]
            whole = [c == m for c, m in zip(meta.context_lens, n, strict=True) if m >= 128]
            seen.append(((meta.long_queries, meta.long_whole), (len(whole), all(whole))))
        return attend(q, cache, layer, meta, scale, k, v)

    monkeypatch.setattr(llama, "attention", spy)
    long = ids_of(llm, text(24, seed=5))
    assert len(long) > 256
    with scheduling(llm, max_num_batched_tokens=128, enable_prefix_caching=True):
        llm.generate([{"prompt_token_ids": long}], GREEDY, use_tqdm=False)  # chunks, decodes
        llm.generate([{"prompt_token_ids": long}], GREEDY, use_tqdm=False)  # a prefix hit
    assert all(flags == expect for flags, expect in seen)
    assert [flags for flags, _ in seen[:3]] == [(1, True), (1, False), (0, True)]
    assert [flags for flags, _ in seen].count((1, True)) == 1, "only the first run's first chunk"


def test_prefix_cache_reuses_shared_and_partial_prefixes(llm):
    base = ids_of(llm, text(24, seed=7))
    assert len(base) > 256
    turn = [ids_of(llm, f" Question {i}: what happened next?") for i in range(2)]
    other = ids_of(llm, " Meanwhile, an unrelated story began far away.")
    prompts = [
        base + turn[0],
        base + turn[1],  # shares the whole base: a second chat turn
        base[:200] + other,  # shares 200 tokens: partial overlap, as RAG chunks do
        base + turn[0],  # the same prompt again: all but its last block cached
        base[:256],  # whole blocks, all cached: the last one is recomputed to get logits
    ]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    with scheduling(llm, enable_prefix_caching=False):
        ref = [tokens(llm.generate(x, GREEDY, use_tqdm=False))[0] for x in inputs]
    with scheduling(llm, enable_prefix_caching=True) as eng:
        outs = [llm.generate(x, GREEDY, use_tqdm=False)[0] for x in inputs]
        stats = eng.stats()
    assert tokens(outs) == ref
    cached = [o.num_cached_tokens for o in outs]
    expect = [0] + [
        min(max(common(p, q) for q in prompts[:i]), len(p) - 1) // 16 * 16
        for i, p in enumerate(prompts[1:], 1)
    ]
    assert cached == expect
    assert cached[1] >= len(base) // 16 * 16 and cached[2] == 192 and cached[4] == 240
    assert stats.prefix_cache_hits == sum(cached)
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert stats.num_running == stats.num_waiting == 0 and stats.blocks_cached > 0


def test_prompt_logprobs_bypass_the_prefix_cache(llm):
    p = {"prompt_token_ids": ids_of(llm, text(8, seed=3))}
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with scheduling(llm):
        first = llm.generate(p, sp, use_tqdm=False)[0]
        second = llm.generate(p, sp, use_tqdm=False)[0]
    assert second.num_cached_tokens == 0
    assert len(second.prompt_logprobs) == len(first.prompt_logprobs) == len(p["prompt_token_ids"])
    for a, b in zip(first.prompt_logprobs[1:], second.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


def test_preemption_keeps_outputs_unchanged(llm):
    prompts = [text(n, seed=100 + n) for n in (2, 3, 5, 7)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = tokens(llm.generate(prompts, sp, use_tqdm=False))
    assert_no_leaks(llm)
    # 12 blocks of 16 tokens hold two of these requests at most: the rest are preempted and
    # recomputed, some of them mid-prefill (chunks of 48, two partial prefills at once).
    tiny = LLM(
        dtype="float32",
        num_kv_blocks=12,
        max_num_batched_tokens=48,
        max_num_partial_prefills=2,
        seed=0,
    )
    assert tokens(tiny.generate(prompts, sp, use_tqdm=False)) == ref
    assert tiny.engine.stats().num_preemptions > 0
    check_books(tiny.engine.pool, tiny.engine.scheduler)
    assert_no_leaks(tiny)


def test_sixteen_concurrent_requests_of_mixed_lengths(llm, monkeypatch):
    rng = random.Random(0)
    shared = text(6, seed=1)
    prompts = [
        (shared if i % 3 == 0 else "") + text(rng.choice([1, 2, 4, 8]), seed=200 + i)
        for i in range(16)
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(1, 8), ignore_eos=True)
        for _ in prompts
    ]
    with scheduling(llm, enable_prefix_caching=False, enable_chunked_prefill=False):
        ref = tokens(llm.generate(prompts, params, use_tqdm=False))
    # Small budget, few running slots, a small pool: chunking, queueing, prefix hits, preemption.
    with scheduling(llm, num_blocks=24, max_num_batched_tokens=64, max_num_seqs=6) as eng:
        batches = record_batches(eng, monkeypatch)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = eng.stats()
    assert tokens(outs) == ref
    assert [len(t) for t in tokens(outs)] == [p.max_tokens for p in params]
    assert max(len(b.items) for b in batches) <= 6
    assert max(b.num_tokens for b in batches) <= 64
    assert stats.prefix_cache_hits > 0


# ---------------------------------------------------------------- scheduling alone, no model


def fake(rid: str, prompt: list[int], max_tokens: int) -> Request:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, None, list(prompt), sp, max_tokens, torch.Generator())


def simulate(sched: Scheduler, reqs: list[Request], max_steps: int = 5000) -> list[Batch]:
    """Run requests to the end with stand-in tokens, checking the books after every step."""
    for r in reqs:
        sched.add(r)
    batches = []
    while sched.has_work():
        assert len(batches) < max_steps, "no progress"
        batch = sched.schedule()
        assert batch.num_tokens <= sched.budget
        for req, n in batch.items:
            sched.computed(req, n)
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(hash((req.request_id, req.num_tokens)) % 5000)
                if len(req.output_token_ids) == req.max_tokens:
                    sched.finish(req)
        check_books(sched.pool, sched)
        batches.append(batch)
    return batches


def make(num_blocks: int, block_size: int = 4, **cfg) -> Scheduler:
    c = EngineConfig(block_size=block_size, **cfg)
    return Scheduler(c, BlockPool(num_blocks, block_size, c.enable_prefix_caching))


def test_random_traffic_on_a_tiny_pool_always_finishes():
    """Shared prefixes, long and short prompts, a pool that fits ~2 requests: every request
    finishes (no deadlock, no starvation) with the books right after every step."""
    rng = random.Random(1)
    stems = [[rng.randrange(5000) for _ in range(40)] for _ in range(3)]
    for cfg in (
        {"max_num_batched_tokens": 16, "max_num_partial_prefills": 1},
        {"max_num_batched_tokens": 48, "max_num_partial_prefills": 2},
        {"max_num_batched_tokens": 64, "long_prefill_token_threshold": 8},
        {"max_num_batched_tokens": 128, "enable_chunked_prefill": False},
    ):
        sched = make(num_blocks=30, **cfg)
        reqs = []
        for i in range(30):
            stem = rng.choice(stems)[: rng.randrange(0, 41)]
            tail = [rng.randrange(5000) for _ in range(rng.randrange(1, 40))]
            reqs.append(fake(f"r{i}", stem + tail, rng.randrange(1, 30)))
        simulate(sched, reqs)
        assert all(len(r.output_token_ids) == r.max_tokens for r in reqs), cfg
        assert sched.num_preemptions > 0 and sched.pool.stats.hits > 0, cfg
        assert sched.pool.counts()["in_use"] == 0


def test_waiting_request_that_cannot_fit_yet_holds_no_blocks():
    """A cache hit must not pin blocks while its request waits: here it would pin half the pool
    while the running request, preempted for lack of blocks, waits ahead of it for them."""
    sched = make(num_blocks=8, max_num_batched_tokens=64)
    prefix = list(range(100, 116))  # 4 blocks of 4
    simulate(sched, [fake("a", prefix + [1], 1)])  # leaves the prefix cached
    big = fake("big", list(range(200, 212)), 20)  # 12 + 20 tokens: the whole pool in the end
    hit = fake("hit", prefix + list(range(300, 312)), 4)  # 4 cached blocks + 3 new ones
    batches = simulate(sched, [big, hit])
    assert [r.request_id for r, _ in batches[0].items] == ["big"]
    assert big.num_preemptions == 0 and hit.num_cached_tokens == 0  # big evicted the prefix
    assert len(big.output_token_ids) == 20 and len(hit.output_token_ids) == 4


def test_decodes_go_before_prefill_chunks():
    sched = make(num_blocks=64, max_num_batched_tokens=8, long_prefill_token_threshold=7)
    long, short = fake("long", list(range(10, 60)), 1), fake("short", [1], 5)
    batches = simulate(sched, [long, short])
    steps = [[(r.request_id, n) for r, n in b.items] for b in batches]
    assert steps[0] == [("long", 7), ("short", 1)]
    assert steps[1:5] == [[("short", 1), ("long", 7)]] * 4


def test_partial_prefill_cap_lets_short_prompts_pass_without_starving_long_ones():
    sched = make(
        num_blocks=256,
        max_num_batched_tokens=32,
        max_num_partial_prefills=1,
        long_prefill_token_threshold=16,
    )
    a, b = fake("A", list(range(100)), 1), fake("B", list(range(1000, 1100)), 1)
    shorts = [fake(f"s{i}", [2000 + i] * 10, 1) for i in range(3)]
    batches = simulate(sched, [a, b, *shorts])
    steps = [[(r.request_id, n) for r, n in bt.items] for bt in batches]
    # A prefills 16 a step; B would be a second partial prefill and waits at the head of the
    # queue, while the short prompts, done within one step, go past it.
    assert steps[0] == [("A", 16), ("s0", 10)]
    assert steps[1] == [("A", 16), ("s1", 10)]
    assert steps[2] == [("A", 16), ("s2", 10)]
    b_start = next(i for i, s in enumerate(steps) if any(r == "B" for r, _ in s))
    a_end = max(i for i, s in enumerate(steps) if any(r == "A" for r, _ in s))
    assert b_start == a_end, "B starts in the step where A's prefill ends"
    assert all(n <= 16 for s in steps for r, n in s if r in ("A", "B"))


def test_whole_prompt_cached_still_computes_its_last_block():
    sched = make(num_blocks=16, max_num_batched_tokens=64)
    p = list(range(300, 316))  # exactly 4 blocks
    simulate(sched, [fake("a", p, 1)])
    again = fake("b", p, 1)
    batches = simulate(sched, [again])
    assert again.num_cached_tokens == 12 and batches[0].items[0][1] == 4


# ---------------------------------------------------------------- the block pool


def test_hash_chain_covers_position_content_and_kv_key():
    pool, bs = BlockPool(8, 4, True, b"bfloat16"), 4
    a = pool.block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 0, None)
    assert len(a) == 2, "only full blocks are hashed"
    b = pool.block_hashes([5, 6, 7, 8, 1, 2, 3, 4], 0, None)
    assert a[0] != b[1], "same tokens, other parent: other hash"
    assert a[1] != b[0]
    assert pool.block_hashes([1, 2, 3, 4, 5, 6, 7, 9], 0, None)[0] == a[0]
    assert pool.block_hashes([1, 2, 3, 4, 5, 6, 7, 9], 0, None)[1] != a[1]
    fp8 = BlockPool(8, bs, True, b"fp8_e4m3:scales=...")
    assert fp8.block_hashes([1, 2, 3, 4], 0, None)[0] != a[0], "the KV key is in every hash"
    assert pool.block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 1, a[0]) == a[1:], "chains resume"


def test_lru_eviction_order_and_refcounts():
    pool = BlockPool(6, 2, True)
    ha = pool.block_hashes([1, 1, 2, 2, 3, 3], 0, None)
    hb = pool.block_hashes([9, 9, 8, 8], 0, None)
    a = pool.allocate(3)
    pool.cache_blocks(a, ha, 0)
    b = pool.allocate(2)
    pool.cache_blocks(b, hb, 0)
    spare = pool.allocate(1)  # never hashed
    assert pool.num_free == 0
    # A second request shares a's first two blocks.
    shared = pool.lookup(ha[:2])
    assert shared == a[:2]
    pool.touch(shared)
    assert [pool.blocks[i].ref_cnt for i in a] == [2, 2, 1]
    pool.free(a)  # a[0], a[1] still referenced; a[2] becomes a cache entry
    pool.free(b)  # b's tail before b's head
    pool.free(spare)  # empty: goes to the front
    assert list(pool.free_queue) == [spare[0], a[2], b[1], b[0]]
    assert pool.counts() == {"free": 1, "cached": 3, "in_use": 2, "total": 6}
    assert pool.allocate(2) == [spare[0], a[2]], "empty first, then least recently used"
    assert pool.lookup(ha) == a[:2] and pool.lookup(hb) == b
    pool.free(shared)
    assert list(pool.free_queue) == [b[1], b[0], a[1], a[0]]
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([a[2]] * 2)


def test_duplicate_blocks_are_not_cached_twice():
    pool = BlockPool(4, 2, True)
    h = pool.block_hashes([5, 5, 6, 6], 0, None)
    x, y = pool.allocate(2), pool.allocate(2)  # the same prefix computed twice at once
    pool.cache_blocks(x, h, 0)
    pool.cache_blocks(y, h, 0)
    assert pool.lookup(h) == x and all(pool.blocks[i].block_hash is None for i in y)
    pool.free(x)
    pool.free(y)
    assert list(pool.free_queue)[:2] == [y[0], y[1]], "duplicates are reused first"
    assert pool.counts()["cached"] == 2 and pool.num_cached_free == 2


def test_pool_operations_are_o1_per_block():
    """Touching cached blocks in the middle of a 200K-block queue costs what it costs in a 2K one
    (a list-based queue would be ~100x slower there)."""
    assert isinstance(BlockPool(1, 16, True).free_queue, OrderedDict)

    def cost(num_blocks: int) -> float:
        pool = BlockPool(num_blocks, 1, True)
        ids = pool.allocate(num_blocks)
        hashes = pool.block_hashes(list(range(num_blocks)), 0, None)
        pool.cache_blocks(ids, hashes, 0)
        pool.free(ids)
        mid = hashes[num_blocks // 2 : num_blocks // 2 + 1000]
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            hit = pool.lookup(mid)
            pool.touch(hit)
            pool.free(hit)
            best = min(best, time.perf_counter() - t)
        return best

    small, large = cost(2_000), cost(200_000)
    assert large < 10 * small, (small, large)

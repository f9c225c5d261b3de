"""Drive the offline engine with timed arrivals (open loop, optional concurrency cap).

Requests join at their arrival time while the engine keeps stepping, so TTFT includes queueing
behind whatever is running, as it would behind a server.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from tqdm.auto import tqdm

from longserve.bench.records import RequestRecord, RequestSpec
from longserve.engine.llm import LLMEngine
from longserve.engine.sampling import SamplingParams
from longserve.engine.scheduler import Scheduler
from longserve.kv.blocks import BlockPool


def reset(engine: LLMEngine, enable_prefix_caching: bool | None = None, **scheduling) -> None:
    """Empty the prefix cache and apply new scheduling knobs to an idle engine (no reload)."""
    if engine.has_unfinished():
        raise RuntimeError("reset needs an idle engine")
    cfg = replace(engine.scheduler.cfg, **scheduling)
    if enable_prefix_caching is not None:
        cfg = replace(cfg, enable_prefix_caching=enable_prefix_caching)
    if not cfg.enable_chunked_prefill:
        cfg = replace(
            cfg, max_num_batched_tokens=max(cfg.max_num_batched_tokens, engine.max_model_len)
        )
    old = engine.pool
    engine.pool = BlockPool(
        old.num_blocks, old.block_size, cfg.enable_prefix_caching, old.extra_key
    )
    engine.scheduler = Scheduler(cfg, engine.pool)


def run(
    engine: LLMEngine,
    specs: list[RequestSpec],
    max_concurrency: int | None = None,
    desc: str = "requests",
) -> tuple[list[RequestRecord], float]:
    """Send every spec at its time; return one record per spec (in spec order) and the wall time."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].at)
    pending = deque(order)
    records: list[RequestRecord | None] = [None] * len(specs)
    live: dict[str, int] = {}
    start = time.time()
    slot_freed = start
    bar = tqdm(total=len(specs), desc=desc, leave=False)
    while pending or live:
        now = time.time()
        while (
            pending
            and start + specs[pending[0]].at <= now
            and (max_concurrency is None or len(live) < max_concurrency)
        ):
            i = pending.popleft()
            s = specs[i]
            sp = SamplingParams(temperature=0, max_tokens=s.max_tokens, ignore_eos=True)
            req = engine.add_request({"prompt_token_ids": s.prompt_token_ids}, sp)
            arrival = max(start + s.at, slot_freed)
            records[i] = RequestRecord(s.kind, len(s.prompt_token_ids), arrival)
            live[req.request_id] = i
        if not live:
            time.sleep(max(0.0, start + specs[pending[0]].at - time.time()))
            continue
        touched = engine.step()
        t = time.time()
        for req in touched:
            rec = records[live[req.request_id]]
            rec.token_times.append(t)
            rec.cached_tokens = req.num_cached_tokens
            if req.finished:
                rec.finish = t
                del live[req.request_id]
                slot_freed = t
                bar.update(1)
    bar.close()
    return records, time.time() - start

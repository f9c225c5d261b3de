"""Async HTTP load against a running server's /v1/completions, streaming (as `vllm bench serve`).

Prompts go as token-id lists so that the server measures exactly the lengths the workload asked
for; every streamed chunk's arrival time is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from tqdm.auto import tqdm

from longserve.bench.records import RequestRecord, RequestSpec


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec, rec: RequestRecord
) -> None:
    payload = {
        "model": model,
        "prompt": spec.prompt_token_ids,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = time.time()
                if chunk.get("choices"):
                    rec.token_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens") or 0
            rec.finish = time.time()
    except (TimeoutError, aiohttp.ClientError) as e:
        rec.error = repr(e)


async def _run(
    url: str, model: str, specs: list[RequestSpec], max_concurrency: int | None, timeout_s: float
) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(max_concurrency or len(specs) or 1)
    records = [RequestRecord(s.kind, len(s.prompt_token_ids), 0.0) for s in specs]
    bar = tqdm(total=len(specs), desc="requests", leave=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.time()

        async def go(spec: RequestSpec, rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, start + spec.at - time.time()))
            async with sem:
                rec.arrival = time.time()
                await _one(session, url, model, spec, rec)
            bar.update(1)

        await asyncio.gather(*(go(s, r) for s, r in zip(specs, records, strict=True)))
    bar.close()
    return records, time.time() - start


def run(
    url: str,
    model: str,
    specs: list[RequestSpec],
    max_concurrency: int | None = None,
    timeout_s: float = 3600.0,
) -> tuple[list[RequestRecord], float]:
    """Send every spec at its time to the server at url; records in spec order, and wall time."""
    return asyncio.run(_run(url.rstrip("/"), model, specs, max_concurrency, timeout_s))

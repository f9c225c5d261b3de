"""The lab's three workloads, as lists of timed requests over token ids.

1. prefix: a long document, then a short user turn; a second turn on the same document reuses
   its KV when the prefix cache is on.
2. chat: Poisson arrivals at a rate, context lengths drawn around a mean, a concurrency cap.
3. mixed: 90% short prompts and 10% long ones arriving together, to be replayed under several
   chunk budgets: the short requests' p99 TTFT is what chunked prefill protects.
Token ids are random (seeded) and distinct per request unless a prefix is meant to be shared.
"""

from __future__ import annotations

import numpy as np

from longserve.bench.records import RequestSpec

LOW_ID = 100  # stay clear of special tokens


def _ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(LOW_ID, vocab, size=n).tolist()


def prefix_turns(doc_tokens: int, turn_tokens: int, vocab: int, seed: int = 0, turns: int = 2):
    """`turns` requests sharing one document, each with its own user turn, sent one after another."""
    rng = np.random.default_rng(seed)
    doc = _ids(rng, doc_tokens, vocab)
    return [
        RequestSpec(0.0, doc + _ids(rng, turn_tokens, vocab), 1, f"turn{i + 1}")
        for i in range(turns)
    ]


def chat(
    num_requests: int,
    rate: float,
    mean_context: int,
    output_tokens: int,
    vocab: int,
    max_model_len: int,
    seed: int = 0,
) -> list[RequestSpec]:
    """Poisson arrivals; context lengths lognormal around the mean (sigma 0.5), clipped to fit."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=num_requests) if rate > 0 else np.zeros(num_requests)
    at = np.cumsum(gaps) - gaps[0]
    sigma = 0.5
    lengths = rng.lognormal(np.log(mean_context) - sigma**2 / 2, sigma, size=num_requests)
    hi = max_model_len - output_tokens - 1
    lengths = np.clip(lengths.astype(int), 16, hi)
    return [
        RequestSpec(float(t), _ids(rng, int(n), vocab), output_tokens, "chat")
        for t, n in zip(at, lengths, strict=True)
    ]


def mixed(
    num_requests: int,
    rate: float,
    short_tokens: int,
    long_tokens: int,
    output_tokens: int,
    vocab: int,
    long_fraction: float = 0.1,
    seed: int = 0,
) -> list[RequestSpec]:
    """Short and long prompts interleaved at a steady rate; every 1/long_fraction-th one is long."""
    rng = np.random.default_rng(seed)
    every = max(1, round(1 / long_fraction))
    specs = []
    for i in range(num_requests):
        is_long = i % every == every // 2
        n = long_tokens if is_long else short_tokens
        specs.append(
            RequestSpec(
                i / rate, _ids(rng, n, vocab), output_tokens, "long" if is_long else "short"
            )
        )
    return specs

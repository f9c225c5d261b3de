"""Per-request timing records and the summary every workload reports (vLLM bench's figures)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestSpec:
    """A request a workload will send: when (seconds after start), what, and its class."""

    at: float
    prompt_token_ids: list[int]
    max_tokens: int
    kind: str = "default"


@dataclass
class RequestRecord:
    kind: str
    prompt_tokens: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    cached_tokens: int = 0
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * 1000.0
    out = {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}
    out["mean"] = round(float(arr.mean()), 3)
    return out


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    """Throughput and latency percentiles in milliseconds, as `vllm bench serve` reports them."""
    ok = [r for r in records if r.error is None and r.finish is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": round(wall_s, 3),
        "request_throughput_s": round(len(ok) / wall_s, 4) if wall_s else 0.0,
        "output_tokens_s": round(out_tokens / wall_s, 2) if wall_s else 0.0,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itls]),
        "e2e_ms": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }


def summarize_by_kind(records: list[RequestRecord], wall_s: float) -> dict:
    kinds = sorted({r.kind for r in records})
    return {k: summarize([r for r in records if r.kind == k], wall_s) for k in kinds}

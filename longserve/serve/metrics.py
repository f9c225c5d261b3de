"""Prometheus metrics under vLLM's names with a `longserve:` prefix.

Latency histograms are observed on the engine thread as tokens come out; the engine's gauges and
counters are read from a snapshot taken on that thread when /metrics is scraped, so scraping never
reads engine state mid-step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from longserve.engine.llm import LLMEngine
from longserve.engine.request import Request

# vLLM's buckets: long prompts make TTFT and end-to-end times span minutes
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests (cached-but-unused ones are free)
    kv_blocks: dict[str, int]  # free / cached / in_use / total
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found cached
    num_preemptions: int


def engine_stats(engine: LLMEngine) -> EngineStats:
    """A snapshot of the engine's counters; run it on the engine thread."""
    pool, sched = engine.pool, engine.scheduler
    return EngineStats(
        num_running=len(sched.running),
        num_waiting=len(sched.waiting),
        kv_cache_usage=pool.usage,
        kv_blocks=pool.counts(),
        prefix_cache_queries=pool.stats.queries,
        prefix_cache_hits=pool.stats.hits,
        num_preemptions=sched.num_preemptions,
    )


class ServerMetrics:
    """The server's registry: request latency histograms plus the engine's snapshot."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.stats: EngineStats | None = None
        m, reg = ["model_name"], self.registry
        self.ttft = Histogram(
            "longserve:time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.itl = Histogram(
            "longserve:inter_token_latency_seconds",
            "Time between consecutive output tokens of a request.",
            m,
            buckets=ITL_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.e2e = Histogram(
            "longserve:e2e_request_latency_seconds",
            "Time from arrival to the last token, for requests that finished (not aborted).",
            m,
            buckets=E2E_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self.success = Counter(
            "longserve:request_success",
            "Requests that finished, by finish reason.",
            m + ["finished_reason"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "longserve:prompt_tokens", "Prompt tokens of finished requests.", m, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "longserve:generation_tokens", "Tokens generated.", m, registry=reg
        ).labels(model_name)
        reg.register(self)

    def on_token(self, req: Request, itl: float | None) -> None:
        """Called on the engine thread for each token; itl is None for the first."""
        self.generation_tokens.inc()
        if itl is None:
            self.ttft.observe(req.metrics.first_token_time - req.metrics.arrival_time)
        else:
            self.itl.observe(itl)
        if req.finish_reason is not None:
            self.e2e.observe(req.metrics.finished_time - req.metrics.arrival_time)
            self.success.labels(self.model_name, req.finish_reason).inc()
            self.prompt_tokens.inc(req.num_prompt_tokens)

    def render(self, stats: EngineStats) -> bytes:
        """The exposition text, with the engine's figures from `stats`."""
        self.stats = stats
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: the engine's figures from the last snapshot."""
        s, m = self.stats, [self.model_name]
        if s is None:
            return
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV blocks in use (1 = full).", s.kv_cache_usage),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"longserve:{name}", doc, labels=["model_name"])
            g.add_metric(m, value)
            yield g
        g = GaugeMetricFamily(
            "longserve:kv_cache_blocks",
            "KV blocks by state: free, cached (reusable, no request holds it), in_use.",
            labels=["model_name", "state"],
        )
        for state in ("free", "cached", "in_use"):
            g.add_metric(m + [state], s.kv_blocks[state])
        yield g
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            "num_preemptions": ("Requests preempted for KV blocks.", s.num_preemptions),
        }  # fmt: skip
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(f"longserve:{name}", doc, labels=["model_name"])
            c.add_metric(m, value)
            yield c

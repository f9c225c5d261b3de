"""The three lab workloads run end to end, against the offline engine or a server URL."""

from __future__ import annotations

from longserve.bench import client, offline, workloads
from longserve.bench.records import RequestSpec, summarize, summarize_by_kind
from longserve.engine.llm import LLMEngine

Target = LLMEngine | str  # an engine, or the base URL of a running server


def _send(
    target: Target, specs: list[RequestSpec], model: str, cap: int | None = None, desc: str = ""
):
    if isinstance(target, str):
        return client.run(target, model, specs, cap)
    return offline.run(target, specs, cap, desc=desc or "requests")


def _warm(target: Target, vocab: int, model: str) -> None:
    """One short request first, so one-time costs (allocation, compilation) stay out of figures."""
    _send(target, [RequestSpec(0.0, list(range(100, 164)), 2, "warmup")], model, desc="warm-up")


def prefix_cache_ttft(
    target: Target, doc_tokens: int, turn_tokens: int, vocab: int, model: str = "", seed: int = 0
) -> dict:
    """TTFT of the first and second turn on one document, prefix caching on and (offline) off."""
    _warm(target, vocab, model)
    modes = [True] if isinstance(target, str) else [True, False]
    out = {"doc_tokens": doc_tokens, "turn_tokens": turn_tokens}
    for on in modes:
        if not isinstance(target, str):
            offline.reset(target, enable_prefix_caching=on)
        turns = workloads.prefix_turns(doc_tokens, turn_tokens, vocab, seed=seed + int(on))
        recs = [_send(target, [t], model, desc=t.kind)[0][0] for t in turns]
        out["cache_on" if on else "cache_off"] = {
            "first_ttft_s": round(recs[0].ttft, 4),
            "second_ttft_s": round(recs[1].ttft, 4),
            "second_cached_tokens": recs[1].cached_tokens,
            "speedup_second_vs_first": round(recs[0].ttft / recs[1].ttft, 2),
        }
    if "cache_off" in out:
        out["speedup_second_turn_on_vs_off"] = round(
            out["cache_off"]["second_ttft_s"] / out["cache_on"]["second_ttft_s"], 2
        )
    return out


def chat_load(
    target: Target,
    num_requests: int,
    rate: float,
    mean_context: int,
    output_tokens: int,
    max_concurrency: int | None,
    vocab: int,
    max_model_len: int,
    model: str = "",
    seed: int = 0,
) -> dict:
    _warm(target, vocab, model)
    specs = workloads.chat(
        num_requests, rate, mean_context, output_tokens, vocab, max_model_len, seed
    )
    records, wall = _send(target, specs, model, max_concurrency, desc="chat")
    return {
        "num_requests": num_requests,
        "rate": rate,
        "mean_context": mean_context,
        "output_tokens": output_tokens,
        "max_concurrency": max_concurrency,
        **summarize(records, wall),
    }


def chunking(spec: int | str | None) -> tuple[int | str, dict]:
    """A chunk-budget spec -> (its label, the scheduler settings): None or "off" (no chunked
    prefill), N (max_num_batched_tokens N), or "N/C" (and at most C tokens of one prompt a step,
    long_prefill_token_threshold: what lets short requests in beside a long prefill)."""
    if spec is None or spec == "off":
        return "off", {"enable_chunked_prefill": False}
    budget, _, cap = str(spec).partition("/")
    sched = {"enable_chunked_prefill": True, "max_num_batched_tokens": int(budget)}
    sched["long_prefill_token_threshold"] = int(cap or 0)
    return (f"{budget}/{cap}" if cap else int(budget)), sched


def mixed_sweep(
    target: Target,
    budgets: list[int | str | None],
    num_requests: int,
    rate: float,
    short_tokens: int,
    long_tokens: int,
    output_tokens: int,
    vocab: int,
    model: str = "",
    seed: int = 0,
) -> dict:
    """Replay the same mixed traffic per chunk budget (a `chunking` spec each)."""
    _warm(target, vocab, model)
    specs = workloads.mixed(
        num_requests, rate, short_tokens, long_tokens, output_tokens, vocab, seed=seed
    )
    rows = []
    for b in budgets if not isinstance(target, str) else [None]:
        label, sched = chunking(b)
        if not isinstance(target, str):
            offline.reset(target, enable_prefix_caching=False, **sched)
        records, wall = _send(target, specs, model, desc=f"budget {label}")
        by = summarize_by_kind(records, wall)
        rows.append(
            {
                "budget": label,
                "short_ttft_ms": by["short"]["ttft_ms"],
                "long_ttft_ms": by["long"]["ttft_ms"],
                "short_tpot_ms": by["short"]["tpot_ms"],
                "output_tokens_s": summarize(records, wall)["output_tokens_s"],
            }
        )
    return {
        "num_requests": num_requests,
        "rate": rate,
        "short_tokens": short_tokens,
        "long_tokens": long_tokens,
        "output_tokens": output_tokens,
        "rows": rows,
    }

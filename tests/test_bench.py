"""The lab's workloads, records and recommendation (small and fast; the report itself is a script)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from longserve.bench import offline, runs, workloads
from longserve.bench.records import RequestRecord, RequestSpec, summarize
from longserve.bench.report import PRESETS, main, predicted_vs_measured, recommend

from .conftest import assert_no_leaks


def test_chat_workload_shape():
    specs = workloads.chat(400, 5.0, 1000, 32, vocab=49152, max_model_len=4096, seed=1)
    lengths = [len(s.prompt_token_ids) for s in specs]
    assert 900 < sum(lengths) / len(lengths) < 1100
    assert max(lengths) <= 4096 - 32 - 1 and min(lengths) >= 16
    ats = [s.at for s in specs]
    assert ats == sorted(ats) and ats[0] == 0.0
    assert 60 < ats[-1] < 100  # 400 arrivals at 5/s
    again = workloads.chat(400, 5.0, 1000, 32, vocab=49152, max_model_len=4096, seed=1)
    assert [s.prompt_token_ids for s in again] == [s.prompt_token_ids for s in specs]


def test_mixed_and_prefix_workloads():
    specs = workloads.mixed(50, 10.0, 64, 2000, 4, vocab=49152)
    kinds = [s.kind for s in specs]
    assert kinds.count("long") == 5 and kinds.count("short") == 45
    assert all(len(s.prompt_token_ids) == (2000 if s.kind == "long" else 64) for s in specs)
    a, b = workloads.prefix_turns(300, 20, vocab=49152)
    assert a.prompt_token_ids[:300] == b.prompt_token_ids[:300]
    assert a.prompt_token_ids[300:] != b.prompt_token_ids[300:]


def test_summary_percentiles_in_ms():
    recs = []
    for i in range(10):
        r = RequestRecord("x", 10, arrival=0.0, token_times=[0.1 * (i + 1), 0.1 * (i + 1) + 0.05])
        r.finish = r.token_times[-1]
        recs.append(r)
    recs.append(RequestRecord("x", 10, 0.0, error="HTTP 400"))
    s = summarize(recs, wall_s=2.0)
    assert s["completed"] == 10 and s["errors"] == 1 and s["output_tokens"] == 20
    assert s["ttft_ms"]["p50"] == pytest.approx(550.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(50.0)
    assert s["output_tokens_s"] == 10.0


def test_offline_driver_and_prefix_reset(llm):
    eng = llm.engine
    specs = [RequestSpec(0.01 * i, list(range(200 + i, 260 + 3 * i)), 4, "k") for i in range(6)]
    recs, wall = offline.run(eng, specs, max_concurrency=3)
    assert all(r.output_tokens == 4 and r.finish and r.ttft > 0 for r in recs)
    assert [r.prompt_tokens for r in recs] == [len(s.prompt_token_ids) for s in specs]
    assert_no_leaks(llm)
    pre = runs.prefix_cache_ttft(eng, doc_tokens=256, turn_tokens=16, vocab=49152)
    assert pre["cache_on"]["second_cached_tokens"] >= 240
    assert pre["cache_off"]["second_cached_tokens"] == 0
    offline.reset(eng, enable_prefix_caching=True)
    assert_no_leaks(llm)


def _parity(deltas: dict[str, list[float]], noise: list[float]) -> dict:
    lengths = [1024, 2048]
    return {
        "lengths": lengths,
        "noise_floor": dict(zip(lengths, noise, strict=True)),
        "recipes": [
            {
                "recipe": name,
                "overrides": {"kv_cache_dtype": name.split(":")[0]},
                "delta": dict(zip(lengths, d, strict=True)),
            }
            for name, d in deltas.items()
        ],
    }


def _mixed(rows: list[tuple]) -> dict:
    return {
        "rows": [
            {"budget": b, "short_ttft_ms": {"p99": s}, "long_ttft_ms": {"p99": lg}}
            for b, s, lg in rows
        ]
    }


def test_recommendation_picks_smallest_format_within_target():
    par = _parity(
        {
            "fp8_e4m3:per_tensor": [-1.0, -6.0],
            "fp8_e4m3:per_head": [0.0, -0.5],
            "int4": [-12.0, -20.0],
        },
        noise=[1.0, 1.5],
    )
    mixed = _mixed([("off", 9000.0, 1000.0), (256, 300.0, 4000.0), (1024, 500.0, 1400.0)])
    rec = recommend(PRESETS["quick"], {"parity": par}, {"mixed": mixed})
    assert rec["kv"]["recipe"] == "fp8_e4m3:per_head"
    assert {r["recipe"] for r in rec["kv_rejected"]} == {"fp8_e4m3:per_tensor", "int4"}
    # 256 has the best short p99 but makes long prompts 4x slower than the best: 1024 wins
    assert rec["budget"] == 1024


def test_predicted_vs_measured_rows():
    speed = {
        "prefix": {"cache_off": {"first_ttft_s": 63.6}, "cache_on": {"second_ttft_s": 1.18}},
        "chat": {"tpot_ms": {"p50": 40.0}},
    }
    rows = predicted_vs_measured(PRESETS["h200"], speed)
    assert [r["name"] for r in rows][0].startswith("TTFT, uncached")
    assert all(r["predicted"] > 0 for r in rows)
    cold = rows[0]
    assert cold["error_pct"] == pytest.approx(
        100 * (63.6 - cold["predicted"]) / cold["predicted"], abs=0.1
    )
    assert rows[1]["predicted"] < cold["predicted"] / 10  # a cached 100K prefix


def test_report_end_to_end_tiny(tmp_path):
    """Every part of `longserve report` on the CPU at toy sizes: files, tables, recommendation."""
    p = replace(
        PRESETS["quick"],
        name="tiny",
        accuracy={"dtype": "float32", "num_kv_blocks": 256},
        recipes=["fp8_e4m3:per_head"],
        tasks="niah_single_1",
        lengths=[512],
        samples=1,
        niah_lengths=[512],
        niah_depths=[50.0],
        speed={"dtype": "float32", "num_kv_blocks": 256},
        prefix={"doc_tokens": 160, "turn_tokens": 16},
        chat={
            "num_requests": 3,
            "rate": 0.0,
            "mean_context": 48,
            "output_tokens": 2,
            "max_concurrency": 2,
        },
        mixed={
            "num_requests": 10,
            "rate": 100.0,
            "short_tokens": 24,
            "long_tokens": 300,
            "output_tokens": 2,
            "budgets": [None, 64],
        },
    )
    md = main(p, str(tmp_path), progress=False)
    text = md.read_text()
    for part in ("## Recommendation", "## Plan", "## Accuracy", "### Mixed traffic", "How this"):
        assert part in text
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["recommendation"]["budget"] in ("off", 64)
    assert res["speed"]["prefix"]["cache_on"]["second_cached_tokens"] >= 160 - 16
    for png in ("niah.png", "parity.png", "ttft.png", "p99_budget.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_chunk_budget_specs():
    """off, N and N/C: a plain budget clears the per-prompt cap a previous N/C run set."""
    chunking = runs.chunking
    assert chunking(None) == ("off", {"enable_chunked_prefill": False})
    assert chunking("off")[0] == "off"
    label, sched = chunking("1024")
    assert label == 1024 and sched["max_num_batched_tokens"] == 1024
    assert sched["long_prefill_token_threshold"] == 0
    label, sched = chunking("1024/512")
    assert label == "1024/512" and sched["long_prefill_token_threshold"] == 512
    assert chunking(256) == chunking("256")

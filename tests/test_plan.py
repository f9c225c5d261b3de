"""The planner against the lecture's Llama-3.3-70B arithmetic at 128K and the H200 ceilings.

The lecture rounds: it writes 320 KB x 131072 = 42 GB where the product is 42.95 GB (40 GiB),
and prices int4 weights at 4 bits for every parameter (35 GB). The planner keeps exact bytes,
int4 group scales included, so lecture figures are matched within a few percent and the exact
values are asserted beside them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from longserve.cli import main
from longserve.models.registry import bundled_configs
from longserve.plan.cost import compare, load_config, plan, weight_bytes
from longserve.plan.hardware import (
    GPUS,
    Efficiency,
    default_efficiency,
    engine_efficiency,
    get_gpu,
)

T = 131072
IDEAL = Efficiency()  # the lecture prices at datasheet peaks


@pytest.fixture(scope="module")
def llama70b():
    return load_config("llama-3.3-70b")


def test_kv_bytes_per_token_and_request(llama70b):
    fp16 = plan(llama70b, "h200-sxm", kv="fp16", context=T)
    assert fp16.kv_bytes_per_token == 327_680 == 320 * 2**10
    assert fp16.kv_bytes_per_request == 40 * 2**30
    assert fp16.kv_bytes_per_request / 1e9 == pytest.approx(42, rel=0.03)
    fp8 = plan(llama70b, "h200-sxm", kv="fp8", context=T)
    assert fp8.kv_bytes_per_request * 2 == fp16.kv_bytes_per_request
    assert fp8.kv_bytes_per_request / 1e9 == pytest.approx(21, rel=0.03)
    # int4: 4-bit payload plus a float16 scale and zero per 64 channels, 8 bytes a head of 128
    int4 = plan(llama70b, "h200-sxm", kv="int4", context=T)
    payload = fp16.kv_bytes_per_request // 4
    assert payload / 1e9 == pytest.approx(10.5, rel=0.03)
    assert int4.kv_bytes_per_request == payload * (64 + 8) // 64  # 12.5% of group scales


def test_kv_read_per_step_on_h200(llama70b):
    p = plan(llama70b, "h200-sxm", kv="fp16", context=T, efficiency=IDEAL)
    assert p.kv_bytes_read_per_step_per_gpu == p.kv_bytes_per_request
    assert p.kv_read_ms_per_step == pytest.approx(40 * 2**30 / 4.8e12 * 1e3)
    assert p.kv_read_ms_per_step == pytest.approx(8.7, rel=0.03)


def test_tpot_int4_weights_fp16_kv_at_128k(llama70b):
    p = plan(llama70b, "h200-sxm", weights="int4", kv="fp16", context=T, efficiency=IDEAL)
    # what a step streams: int4 linears (0.5 B + 4 B per 128 weights) and lm_head + norms in bf16
    h, v, i, L = 8192, 128256, 28672, 80
    linears = L * (h * (h + 1024 + 1024) + h * h + 3 * h * i)
    read = linears // 2 + linears * 4 // 128 + 2 * (v * h + L * 2 * h + h)
    assert p.weight_bytes_read_per_step_per_gpu == read
    assert p.tpot_ms == pytest.approx((read + 40 * 2**30) / 4.8e12 * 1e3)
    assert p.tpot_ms == pytest.approx(16, rel=0.07)  # 17.0: scales and a bf16 lm_head
    # with the lecture's weight bytes (every parameter at 4 bits) the sum is its 16 ms
    lecture_weight_ms = llama70b.num_params / 2 / 4.8e12 * 1e3
    assert p.kv_read_ms_per_step + lecture_weight_ms == pytest.approx(16, rel=0.03)
    assert p.decode_compute_ms_per_step < 0.05 * p.tpot_ms  # decode at batch 1 is bandwidth


def test_prefill_flops_at_128k(llama70b):
    p = plan(llama70b, "h200-sxm", context=T)
    h, v, i, L = 8192, 128256, 28672, 80
    per_token = 2 * L * (h * (h + 1024 + 1024) + h * h + 3 * h * i)
    assert p.prefill.matmul_flops == per_token * T + 2 * v * h
    assert p.prefill.matmul_flops / 1e15 == pytest.approx(18.3, rel=0.03)
    # the lecture's 2 x 64 x T^2 x 128 is one layer's QK^T over every pair; causal attention
    # keeps T(T+1)/2 pairs, adds PV, and runs in 80 layers
    assert p.prefill.attention_flops == L * 2 * (2 * 64 * 128 * T * (T + 1) / 2)
    assert 0.5 < p.prefill.attention_flops / p.prefill.matmul_flops < 2
    # and it is the count behind GPU.md's causal SDPA ceiling: 504 ms a layer at 558 TFLOP/s
    assert p.prefill.attention_flops / L / 0.504 / 1e12 == pytest.approx(558, rel=0.01)


def test_prefill_on_4xh100_as_the_lecture_prices_it(llama70b):
    eff = Efficiency(matmul_bf16=0.8)
    p = plan(llama70b, "h100-sxm", tp=4, context=T, efficiency=eff)
    assert p.prefill.matmul_s == pytest.approx(5.8, rel=0.03)


def test_weight_bytes_agree_with_the_parameter_count():
    for name in bundled_configs():
        m = load_config(name)
        assert weight_bytes(m, "bf16").resident == 2 * m.num_params, name
        assert weight_bytes(m, "int4").resident < weight_bytes(m, "fp8").resident


def test_concurrency_on_4xh100_int4_weights(llama70b):
    def fit(kv: str, util: float) -> int:
        p = plan(llama70b, "h100-sxm", 4, "int4", kv, T, gpu_memory_utilization=util)
        budget = util * 80e9 - p.weight_bytes / 4
        assert p.max_concurrent_requests == math.floor(budget / (p.kv_bytes_per_request / 4))
        return p.max_concurrent_requests

    # the lecture's (320 GB - 35 GB) / 42 GB and / 21 GB, with no reserve
    assert (fit("fp16", 1.0), fit("fp8", 1.0)) == (6, 13)
    # keeping the engine's 10% reserve for activations costs one and two requests
    assert (fit("fp16", 0.9), fit("fp8", 0.9)) == (5, 11)


def test_cached_prefix_is_shared_and_skips_prefill(llama70b):
    ctx, cached = 101_000, 100_000
    cold = plan(llama70b, "h100-sxm", 4, "bf16", "fp8", ctx)
    warm = plan(llama70b, "h100-sxm", 4, "bf16", "fp8", ctx, prefix_cached=cached)
    assert warm.prefill.new_tokens == 1000
    assert warm.prefill_uncached == cold.prefill
    assert warm.prefill.attention_flops == cold.prefill.attention_flops * (
        (1000 * cached + 1000 * 1001 / 2) / (ctx * (ctx + 1) / 2)
    )
    assert warm.prefill.ttft_s < cold.prefill.ttft_s / 50
    assert warm.max_concurrent_requests > 10 * cold.max_concurrent_requests
    assert warm.tpot_ms == cold.tpot_ms  # decode still reads the whole context


def test_tensor_parallel_splits_kv_heads(llama70b):
    one = plan(llama70b, "h200-sxm", 1, "fp8", "fp8", T, batch=4)
    eight = plan(llama70b, "h200-sxm", 8, "fp8", "fp8", T, batch=4)
    assert eight.kv_bytes_read_per_step_per_gpu * 8 == one.kv_bytes_read_per_step_per_gpu
    assert eight.kv_read_ms_per_step == pytest.approx(one.kv_read_ms_per_step / 8)
    with pytest.raises(ValueError, match="evenly"):
        plan(llama70b, "h200-sxm", tp=3)
    # more ranks than KV heads: each rank keeps a whole KV head
    llama8b = load_config("llama-3.1-8b")  # 32 query, 8 KV heads
    full = plan(llama8b, "h200-sxm", context=T).kv_bytes_read_per_step_per_gpu
    assert plan(llama8b, "h200-sxm", tp=16, context=T).kv_bytes_read_per_step_per_gpu * 8 == full


def test_default_efficiencies_come_from_the_measured_h200(llama70b):
    datasheet, measured = GPUS["h200-sxm"], GPUS["h200-measured"]
    assert default_efficiency(measured, engine=False) == Efficiency()
    assert default_efficiency(datasheet, engine=False).kv_read == pytest.approx(3.63 / 4.8)
    # the engine's calibration rides on either entry: same rates, same host overhead
    assert default_efficiency(measured) == engine_efficiency()
    assert default_efficiency(datasheet).attention == pytest.approx(
        558 / 989.5 * engine_efficiency().attention
    )
    for engine in (False, True):
        a = plan(
            llama70b,
            datasheet,
            1,
            "fp8",
            "fp8",
            T,
            efficiency=default_efficiency(datasheet, engine),
        )
        b = plan(
            llama70b, measured, 1, "fp8", "fp8", T, efficiency=default_efficiency(measured, engine)
        )
        assert a.tpot_ms == pytest.approx(b.tpot_ms)
        assert a.prefill.ttft_s == pytest.approx(b.prefill.ttft_s)


def test_engine_calibration_adds_host_time_and_prices_each_kv_format(llama70b):
    eng = engine_efficiency()
    assert 0 < eng.attention < 1 and eng.step_overhead_ms > 0
    ceil = plan(
        llama70b, "h200-measured", 1, "fp8", "fp8_e4m3", T, batch=4, efficiency=Efficiency()
    )
    cal = plan(llama70b, "h200-measured", 1, "fp8", "fp8_e4m3", T, batch=4)
    assert cal.step_overhead_ms == pytest.approx(
        eng.step_overhead_ms + 4 * eng.step_overhead_ms_per_seq
    )
    assert cal.kv_read_ms_per_step == pytest.approx(ceil.kv_read_ms_per_step / eng.kv_read_fp8)
    assert cal.tpot_ms == pytest.approx(
        max(cal.kv_read_ms_per_step + cal.weight_read_ms_per_step, cal.decode_compute_ms_per_step)
        + cal.step_overhead_ms
    )
    assert cal.prefill.attention_s == pytest.approx(ceil.prefill.attention_s / eng.attention_fp8)
    bf16 = plan(llama70b, "h200-measured", 1, "fp8", "bf16", T, efficiency=Efficiency())
    cal = plan(llama70b, "h200-measured", 1, "fp8", "bf16", T)
    assert cal.prefill.attention_s == pytest.approx(bf16.prefill.attention_s / eng.attention)


@pytest.mark.parametrize(
    "kv,share",
    [("bf16", "attention_tma"), ("fp8_e4m3", "attention_tma_fp8"), ("int4", "attention")],
)
def test_block_size_picks_the_prefill_kernel_share(llama70b, kv, share):
    """Pages of 64+ tokens price prefill attention at the TMA kernel's share (bf16/fp16 and fp8;
    int4 keeps paged extend's), pages of 16 at paged extend's; decode takes the Gluon kernel in
    both; nothing else moves."""
    eng = engine_efficiency()
    ceil = plan(llama70b, "h200-measured", 1, "fp8", kv, T, efficiency=Efficiency())
    small = plan(llama70b, "h200-measured", 1, "fp8", kv, T, block_size=16)
    big = plan(llama70b, "h200-measured", 1, "fp8", kv, T, block_size=128)
    assert big.prefill.attention_s == pytest.approx(ceil.prefill.attention_s / getattr(eng, share))
    assert small.prefill.attention_s == pytest.approx(
        ceil.prefill.attention_s / eng.attention_for(kv, 16)
    )
    assert big.max_concurrent_requests == small.max_concurrent_requests
    assert big.tpot_ms == pytest.approx(small.tpot_ms)
    assert small.kv_read_ms_per_step == pytest.approx(
        ceil.kv_read_ms_per_step / eng.kv_read_for(kv)
    )
    if kv != "int4":
        assert big.prefill.ttft_s < small.prefill.ttft_s
    with pytest.raises(ValueError, match="block_size"):
        plan(llama70b, "h200-measured", 1, "fp8", kv, T, block_size=0)


def test_engine_calibration_is_what_the_committed_measurements_give(tmp_path):
    """The shipped calibration equals a refit from the committed H200 results (no hand edits)."""
    from benchmarks.calibrate_planner import main as refit

    out = tmp_path / "engine.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["calibrate_planner", "--out", str(out)])
        mp.chdir(Path(__file__).parent.parent)
        refit()
    assert json.loads(out.read_text())["efficiency"] == asdict(engine_efficiency())


def test_gpu_from_a_json_file(tmp_path):
    path = tmp_path / "h100-copy.json"
    fields = {**vars(GPUS["h100-sxm"]), "name": "h100-copy"}
    path.write_text(json.dumps(fields))
    assert get_gpu(str(path)) == GPUS["h100-sxm"].__class__(**fields)
    path.write_text(json.dumps({"name": "half"}))
    with pytest.raises(ValueError, match="exactly the fields"):
        get_gpu(str(path))


def test_compare_gives_the_error_of_each_figure(llama70b):
    p = plan(llama70b, "h200-sxm", 1, "fp8", "fp8", T)
    out = compare(p, {"tpot_ms": p.tpot_ms * 1.25, "ttft_s": p.prefill.ttft_s / 2})
    assert out["tpot_ms"]["error"] == pytest.approx(-0.2)
    assert out["ttft_s"]["error"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a predicted figure"):
        compare(p, {"weights": 1.0})


def test_cli_json_and_table(capsys):
    args = ["plan", "--model", "llama-3.3-70b", "--gpu", "h200-sxm", "--weights", "int4"]
    args += ["--kv", "fp16", "--context", str(T), "--kv-read-eff", "1", "--weight-read-eff", "1"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in (
        "kv_bytes_per_token",
        "kv_bytes_per_request",
        "kv_read_ms_per_step",
        "weight_read_ms_per_step",
        "tpot_ms",
        "prefill_matmul_flops",
        "prefill_attention_flops",
        "ttft_s",
        "max_concurrent_requests",
    ):
        assert key in d, key
    assert d["kv_bytes_per_token"] == 327_680
    assert d["kv_read_ms_per_step"] == pytest.approx(8.95, abs=0.01)
    # the other rates: the engine's share of the H200's ceilings (derated from the datasheet)
    eng = engine_efficiency()
    assert d["efficiency"]["matmul_bf16"] == pytest.approx(775 / 989.5 * eng.matmul_bf16)
    assert d["step_overhead_ms"] == pytest.approx(
        eng.step_overhead_ms + eng.step_overhead_ms_per_seq
    )
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "42.95 GB (40.00 GiB)" in text and "TPOT" in text and "8.95 ms" in text
    assert "host overhead" in text
    assert main(args + ["--ceilings", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["efficiency"]["matmul_bf16"] == pytest.approx(775 / 989.5)
    assert d["step_overhead_ms"] == 0
    assert main(["plan", "--model", "llama-3.3-70b", "--gpu", "a100"]) == 2

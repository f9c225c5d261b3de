"""KV cache precision: formats round-trip within their bounds, saturate, and the engine runs in each."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.kv.cache import KVCache
from longserve.kv.calibrate import MARGIN, kv_scales
from longserve.kv.quant import (
    KV_FORMATS,
    dequantize_int4,
    fp8_scales,
    kv_bytes_per_token,
    kv_format,
    quantize_int4,
)
from longserve.ops.triton.kv import PagedKV, paged_kv

from .conftest import assert_no_leaks

FORMATS = ["auto", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int4"]
# worst relative error of one element for values in range (half a unit in the last place)
FP_REL = {"bf16": 2**-8, "fp16": 2**-11, "fp8_e4m3": 2**-4, "fp8_e5m2": 2**-3}


def _cache(fmt: str, x: torch.Tensor, per_head: bool = True, group: int = 32) -> KVCache:
    """A one-layer cache holding x [T, H, D] as both keys and values, scales from x's amax."""
    t, h, d = x.shape
    scales = None
    if kv_format(fmt).static_scales:
        amax = x.abs().amax((0, 2)).expand(1, 2, h)
        scales = fp8_scales(amax, kv_format(fmt), "per_head" if per_head else "per_tensor")
    kv = KVCache(1, -(-t // 8), 8, h, d, torch.float32, torch.device("cpu"), fmt, scales, group)
    kv.write(0, x, x, torch.arange(t))
    return kv


def _round_trip(kv: KVCache, t: int) -> torch.Tensor:
    k, v = kv.gather(0, torch.arange(kv.num_blocks), t, torch.float32)
    assert torch.equal(k, v)
    return k


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_float_formats_round_trip_within_half_an_ulp(fmt):
    x = torch.randn(40, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    kv = _cache(fmt, x)
    assert kv.k[0].dtype == KV_FORMATS[fmt].storage
    y = _round_trip(kv, 40)
    normal = x.abs() > 2**-6 * x.abs().amax()  # fp8 keeps relative precision above its subnormals
    rel = ((y - x).abs() / x.abs())[normal]
    assert rel.max() <= FP_REL[fmt] * 1.0001
    assert (y - x).abs().max() <= FP_REL[fmt] * x.abs().amax()


@pytest.mark.parametrize("group", [64, 32, 16])
def test_int4_round_trip_within_half_a_step(group):
    x = torch.randn(40, 3, 64, generator=torch.Generator().manual_seed(1)) * 3 + 1
    kv = _cache("int4", x, group=group)
    assert kv.k[0].dtype == torch.uint8 and kv.k[0].shape[-1] == 32
    assert kv.k_group_scale[0].dtype == torch.float16
    assert kv.k_group_scale[0].shape[-1] == 64 // group
    y = _round_trip(kv, 40)
    g = x.reshape(40, 3, -1, group)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(group, -1)
    # half a step, plus the float16 rounding of scale and zero point
    assert ((y - x).abs() <= step * 0.5 + step * 16 * 2**-11 + 1e-6).all()


def test_int4_nibble_order_and_degenerate_groups():
    x = torch.zeros(3, 1, 8)
    x[0, 0] = torch.tensor([0.0, 15, 1, 2, 0, 3, 4, 15])  # scale 1, zero 0: q = x
    x[1, 0] = 1e4  # constant group far from zero: zero point must stay finite in float16
    x[2, 0] = torch.tensor([100.0, 100.001] * 4)  # narrow for its magnitude
    q, scale, zero = quantize_int4(x, 4)
    # quarters of two channels: word c holds channels c, c + 2, c + 4, c + 6, low nibble first
    assert q[0, 0].tolist() == [0x10, 0x40, 0x2F, 0xF3]
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    y = dequantize_int4(q, scale, zero, torch.float32)
    assert torch.allclose(y, x, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["fp16", "fp8_e4m3", "fp8_e5m2", "int4"])
def test_out_of_range_values_saturate(fmt):
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(2))
    kv = _cache(fmt, x)  # scales (fp8) calibrated on x
    big = x.clone()
    big[0, 0, 0], big[1, 1, 5], big[2, 0, 7] = 1e9, -1e9, 3e38
    kv.write(0, big, big, torch.arange(16))
    y = _round_trip(kv, 16)
    assert torch.isfinite(y).all()
    if fmt == "int4":  # a float16 scale saturates too: the group decodes to finite values
        return
    top = torch.finfo(KV_FORMATS[fmt].storage).max * torch.ones(2)  # per head
    if kv.scales is not None:
        top = top * kv.scales[0, 0]
    assert (y.abs().amax((0, 2)) <= top).all()
    assert y[0, 0, 0] == top[0] and y[1, 1, 5] == -top[1]  # the largest value, sign kept


@pytest.mark.parametrize("fmt, outlier", [("fp8_e4m3", 1e5), ("fp8_e5m2", 3e9)])
def test_per_head_scales_beat_per_tensor_on_an_outlier_head(fmt, outlier):
    """One head far louder than the others: a per-tensor scale sized for it drops the quiet
    heads into fp8's subnormals (or to zero); per-head scales keep them at full precision.
    At a spread of 10x (real heads spread less, docs/kv_precision.md) the two are alike."""
    x = torch.randn(64, 4, 64, generator=torch.Generator().manual_seed(3))
    quiet = [0, 1, 3]

    def err(loud: float, per_head: bool) -> float:
        xs = x.clone()
        xs[:, 2] *= loud
        y = _round_trip(_cache(fmt, xs, per_head=per_head), 64)
        return ((y - xs)[:, quiet].norm() / xs[:, quiet].norm()).item()

    assert err(outlier, True) < FP_REL[fmt]
    assert err(outlier, False) > 10 * err(outlier, True)
    assert err(10.0, False) < 1.05 * err(10.0, True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_is_the_planners(fmt, dtype):
    for heads, dim, group in ((3, 64, 64), (8, 128, 32)):
        kv = KVCache(2, 4, 16, heads, dim, dtype, torch.device("cpu"), fmt,
                     torch.ones(2, 2, heads) if kv_format(fmt).static_scales else None,
                     group)  # fmt: skip
        assert kv.bytes_per_token == kv_bytes_per_token(2, heads, dim, fmt, dtype.itemsize, group)


def test_prefix_cache_key_names_format_and_scales():
    def key(fmt: str, scales: torch.Tensor | None = None, group: int = 64) -> bytes:
        return KVCache(
            2, 1, 16, 3, 64, torch.float32, torch.device("cpu"), fmt, scales, group
        ).cache_key

    s = torch.full((2, 2, 3), 0.01)
    assert key("fp8_e4m3", s) == key("fp8_e4m3", s.clone())
    keys = [key("auto"), key("bf16"), key("fp16"), key("int4"), key("int4", group=32)]
    keys += [key("fp8_e4m3", s), key("fp8_e5m2", s), key("fp8_e4m3", s * 2)]
    keys += [key("fp8_e4m3", s[..., 0])]  # per_tensor, same numbers
    assert len(set(keys)) == len(keys)


def test_scales_are_checked():
    with pytest.raises(ValueError, match="needs scales"):
        KVCache(2, 4, 16, 3, 64, torch.float32, torch.device("cpu"), "fp8_e4m3")
    with pytest.raises(ValueError, match="finite and positive"):
        KVCache(2, 4, 16, 3, 64, torch.float32, torch.device("cpu"), "fp8_e4m3", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="group size"):
        KVCache(2, 4, 16, 3, 64, torch.float32, torch.device("cpu"), "int4", None, 48)
    with pytest.raises(ValueError, match="group size"):  # the kernels read 4-channel words
        KVCache(2, 4, 16, 3, 96, torch.float32, torch.device("cpu"), "int4", None, 6)
    with pytest.raises(ValueError, match="quarter of the head"):  # at start, on every device
        KVCache(2, 4, 16, 3, 96, torch.float32, torch.device("cpu"), "int4", None, 16)
    with pytest.raises(ValueError, match="unknown kv cache dtype"):
        LLM(kv_cache_dtype="fp7")
    with pytest.raises(ValueError, match="kv_scale"):
        LLM(kv_scale="per_token")


def test_engine_generates_in_every_format(llm):
    """One engine per format on the embedded model (float32): it generates, its cache holds the
    format's bytes, the prefix-cache key differs per format and scaling, and no block leaks."""
    prompts = ["The capital of France is", "Water boils at"]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    keys = {llm.engine.pool.extra_key}
    runs = [("bf16", "per_head"), ("fp16", "per_head"), ("fp8_e4m3", "per_tensor")]
    runs += [("fp8_e5m2", "per_head"), ("int4", "per_head")]
    for fmt, scale in runs:
        eng = LLM(dtype="float32", num_kv_blocks=16, kv_cache_dtype=fmt, kv_scale=scale)
        ids = [o.outputs[0].token_ids for o in eng.generate(prompts, sp, use_tqdm=False)]
        assert all(len(i) == 8 for i in ids), (fmt, scale)
        assert ids[0][:2] == ref[0][:2], (fmt, scale)  # " Paris" survives every format
        m, kv = eng.engine.model_config, eng.engine.kv
        assert kv.k[0].dtype == (KV_FORMATS[fmt].storage or torch.float32)
        assert kv.bytes_per_token == kv_bytes_per_token(
            m.num_layers, m.num_kv_heads, m.head_dim, fmt, 4
        )
        keys.add(eng.engine.pool.extra_key)
        assert_no_leaks(eng)
        del eng
    assert len(keys) == len(runs) + 1  # the prefix cache never mixes formats or scales


def test_calibration_is_cached_per_head_and_logged(llm, caplog):
    eng = llm.engine
    m = eng.model_config

    def scales(fmt: str, scale: str):
        cfg = replace(eng.cfg, kv_cache_dtype=fmt, kv_scale=scale)
        return kv_scales(cfg, eng.source, m, eng.model, eng.tokenizer, eng.max_model_len)

    with caplog.at_level("INFO", logger="longserve"):
        head = scales("fp8_e4m3", "per_head")
    tensor, e5 = scales("fp8_e4m3", "per_tensor"), scales("fp8_e5m2", "per_head")
    assert head.scales.shape == (m.num_layers, 2, m.num_kv_heads)
    assert tensor.scales.shape == (m.num_layers, 2)
    assert torch.equal(tensor.scales, head.scales.amax(-1))
    assert torch.allclose(e5.scales * 57344, head.scales * 448)  # one calibration serves both
    assert (head.scales != 1.0).all()
    assert "fp8_e4m3, per_head scales" in caplog.text and "calibration on" in caplog.text
    assert "reused from" in tensor.source and f"margin {MARGIN}" in tensor.source
    saved = json.loads(Path(tensor.source.split("reused from ")[1]).read_text())
    assert torch.equal(torch.tensor(saved["kv_range"]) * MARGIN / 448, head.scales)
    assert "calibration.txt" in saved["text"]
    assert scales("int4", "per_head") is None and scales("bf16", "per_head") is None


def test_checkpoint_scales_are_used(tmp_path, caplog):
    """An HF folder with k_scale/v_scale tensors: the engine loads them instead of calibrating."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(hf).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    ck = torch.tensor([[[0.5, 0.5], [0.25, 0.75]], [[1.0, 1.0], [2.0, 2.0]]])
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor([0.25, 0.75])
    weights["model.layers.1.self_attn.k_scale"] = torch.tensor(1.0)
    weights["model.layers.1.self_attn.v_scale"] = torch.tensor(2.0)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="longserve"):
        llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_dtype="fp8_e4m3", num_kv_blocks=8)
    assert torch.allclose(llm.engine.kv.scales, ck)
    assert "k_scale/v_scale tensors of the checkpoint" in caplog.text
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4), False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_no_leaks(llm)


def test_kernel_view_refuses_layouts_the_kernels_cannot_read():
    cache = KVCache(1, 4, 16, 2, 64, torch.float32, torch.device("cpu"), "int4")
    kv = paged_kv(cache, 0)
    assert paged_kv(cache, 0) is kv  # built once: every step of every layer asks for it
    with pytest.raises(ValueError, match="whole-group strides"):
        PagedKV(kv.k, kv.v, kv.k_scale, kv.v_scale, kv.k_zero.transpose(0, 1), kv.v_zero)
    odd = paged_kv(
        KVCache(1, 4, 16, 2, 96, torch.float32, torch.device("cpu"), "int4", None, 24), 0
    )
    with pytest.raises(ValueError, match="quarter of the head"):  # 24 channels, groups of 16
        PagedKV(odd.k, odd.v, odd.k_scale, odd.v_scale, odd.k_zero, odd.v_zero, 16)
    pool = torch.zeros(4, 16, 2, 66, dtype=torch.uint8)[..., :64]  # rows 66 bytes apart
    with pytest.raises(ValueError, match="4-byte words"):
        PagedKV(pool.view(torch.float8_e4m3fn), pool.view(torch.float8_e4m3fn), *torch.ones(2))

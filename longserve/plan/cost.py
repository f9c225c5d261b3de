"""The cost model at long context: KV and weight bytes, decode bandwidth, prefill FLOPs, what fits.

Bytes come from the format tables the engine itself uses (kv/quant.py, models/weights.py), so the
plan and the engine cannot disagree on what a token or a weight costs. Times are rooflines: a step
takes the longer of its bytes over bandwidth and its FLOPs over the tensor rate, each rate a GPU
entry's figure times an efficiency. By default the efficiencies are this engine's, calibrated on
the H200 (hardware.default_efficiency), and a decode step adds the engine's host overhead. Left
out: tensor-parallel communication and prefill chunking (a prefill is one pass, alone on its
GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from longserve.config import EngineConfig, ModelConfig
from longserve.kv.quant import kv_bytes_per_token
from longserve.models.registry import resolve
from longserve.models.weights import linear_bytes
from longserve.plan.hardware import GPU, Efficiency, default_efficiency, get_gpu

# The engine's share of HBM for weights and KV; the rest is the activation and runtime reserve.
DEFAULT_GPU_MEMORY_UTILIZATION = EngineConfig().gpu_memory_utilization


def load_config(model: str) -> ModelConfig:
    """The config of a bundled name, an HF folder or a GGUF file, without loading any weights."""
    from longserve.models import loader

    src = resolve(model)
    if src.kind == "config":
        return ModelConfig.from_json(src.path)
    if src.kind == "hf":
        return loader.hf_config(src.path)
    from gguf import GGUFReader

    return loader.gguf_config(GGUFReader(src.path), src.name)


def layer_linears(m: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) features of each linear layer in one decoder layer: q, k, v, o, gate, up, down."""
    h, i = m.hidden_size, m.intermediate_size
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


@dataclass(frozen=True)
class WeightBytes:
    """Decoder linears in the chosen format; embeddings, lm_head, norms and biases in bf16, as
    int4 and fp8 checkpoints keep them."""

    resident: int  # held in HBM
    read_per_step: int  # streamed by one decode step (the embedding table is only indexed)


def weight_bytes(m: ModelConfig, fmt: str) -> WeightBytes:
    h = m.hidden_size
    linears = m.num_layers * sum(linear_bytes(o, i, fmt) for o, i in layer_linears(m))
    bias = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim if m.qkv_bias else 0
    small = 2 * (m.num_layers * (2 * h + bias) + h)
    table = linear_bytes(m.vocab_size, h, "bf16")
    resident = linears + small + table * (1 if m.tie_word_embeddings else 2)
    return WeightBytes(resident, linears + small + table)


@dataclass(frozen=True)
class Prefill:
    """One prompt's prefill: `new` tokens computed after `cached` tokens found in the prefix cache."""

    new_tokens: int
    cached_tokens: int
    matmul_flops: float  # all GPUs together
    attention_flops: float
    matmul_s: float
    attention_s: float
    memory_s: float  # weights and the prompt's KV streamed once
    ttft_s: float


@dataclass(frozen=True)
class Plan:
    model: str
    gpu: GPU
    tp: int
    weights: str
    kv: str
    block_size: int
    context: int
    batch: int
    prefix_cached: int
    efficiency: Efficiency
    gpu_memory_utilization: float
    window: int
    # rates in force: the GPU's figures times the efficiencies
    weight_read_tbps: float
    kv_read_tbps: float
    matmul_tflops: float  # fp8 for fp8 weights, else bf16
    attention_tflops: float
    # memory (per request: the whole model, all GPUs; per GPU: one GPU's share under TP)
    kv_bytes_per_token: int
    kv_bytes_per_request: int
    weight_bytes: int
    weight_bytes_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_budget_bytes_per_gpu: int
    max_concurrent_requests: int
    # one decode step of `batch` requests at `context` tokens, per GPU
    kv_bytes_read_per_step_per_gpu: int
    weight_bytes_read_per_step_per_gpu: int
    kv_read_ms_per_step: float
    weight_read_ms_per_step: float
    decode_flops_per_step_per_gpu: float
    decode_compute_ms_per_step: float
    step_overhead_ms: float  # the engine's host share of a step, added to the GPU's time
    tpot_ms: float
    prefill: Prefill  # with `prefix_cached` tokens cached
    prefill_uncached: Prefill  # the whole prompt computed

    def to_dict(self) -> dict:
        """Flat JSON: bytes, FLOPs, *_ms, *_s; prefill keys for the run as planned, *_uncached
        for the whole prompt computed."""
        d = {k: v for k, v in asdict(self).items() if k not in ("prefill", "prefill_uncached")}
        for suffix, p in (("", self.prefill), ("_uncached", self.prefill_uncached)):
            d[f"prefill_tokens{suffix}"] = p.new_tokens
            d[f"prefill_matmul_flops{suffix}"] = p.matmul_flops
            d[f"prefill_attention_flops{suffix}"] = p.attention_flops
            d[f"prefill_matmul_s{suffix}"] = p.matmul_s
            d[f"prefill_attention_s{suffix}"] = p.attention_s
            d[f"prefill_memory_s{suffix}"] = p.memory_s
            d[f"ttft_s{suffix}"] = p.ttft_s
        d["batch_fits"] = self.batch <= self.max_concurrent_requests
        return d


def kv_heads_per_gpu(m: ModelConfig, tp: int) -> int:
    """KV heads split over TP ranks; with more ranks than KV heads each rank holds a copy of one."""
    if tp < 1 or m.num_heads % tp or (m.num_kv_heads % tp and tp % m.num_kv_heads):
        raise ValueError(
            f"tp {tp} does not split {m.num_heads} query / {m.num_kv_heads} KV heads evenly"
        )
    return max(1, m.num_kv_heads // tp)


def plan(
    m: ModelConfig,
    gpu: GPU | str,
    tp: int = 1,
    weights: str = "bf16",
    kv: str = "bf16",
    context: int | None = None,
    batch: int = 1,
    prefix_cached: int = 0,
    efficiency: Efficiency | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    block_size: int = EngineConfig.block_size,
) -> Plan:
    """Price `batch` requests of `context` tokens each (prompt and output held in KV) on `tp` GPUs.

    A cached prefix is shared: concurrent requests hold its KV once, and a prefill computes only
    the tokens after it. Decode still attends over the whole context of every request. The KV
    block size sets which kernel prices prefill attention (Efficiency.attention_for).
    """
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    eff = efficiency or default_efficiency(gpu)
    context = context or m.window
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= prefix_cached < context:
        raise ValueError(f"prefix_cached must be in [0, context), got {prefix_cached}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError("gpu_memory_utilization must be in (0, 1]")
    L, d = m.num_layers, m.head_dim
    kv_token = kv_bytes_per_token(L, m.num_kv_heads, d, kv)
    kv_token_gpu = kv_bytes_per_token(L, kv_heads_per_gpu(m, tp), d, kv)
    wb = weight_bytes(m, weights)

    # memory: the engine's share of HBM, less this GPU's weights, is its KV budget
    hbm = gpu.hbm_gb * 1e9
    weights_gpu = math.ceil(wb.resident / tp)
    reserve = round(hbm * (1 - gpu_memory_utilization))
    budget = int(hbm) - reserve - weights_gpu
    shared = prefix_cached * kv_token_gpu
    per_request = (context - prefix_cached) * kv_token_gpu
    fit = max(0, (budget - shared) // per_request) if budget >= shared else 0

    # decode: every request reads its whole context; the weights are read once per step
    wr_bw = gpu.weight_read_tbps * 1e12 * eff.weight_read
    kv_bw = gpu.kv_read_tbps * 1e12 * eff.kv_read_for(kv)
    mm_rate = 1e12 * (
        gpu.fp8_tflops * eff.matmul_fp8 if weights == "fp8" else gpu.bf16_tflops * eff.matmul_bf16
    )
    attn_rate = gpu.attention_tflops * 1e12 * eff.attention_for(kv, block_size)
    kv_step = batch * context * kv_token_gpu
    w_step = math.ceil(wb.read_per_step / tp)
    linear_params = L * sum(o * i for o, i in layer_linears(m))
    head_params = m.vocab_size * m.hidden_size
    attn_per_pair = 4 * m.num_heads * d * L  # QK^T and PV, a multiply-add each, per (query, key)
    mm_step = batch * 2 * (linear_params + head_params) / tp
    attn_step = batch * attn_per_pair * context / tp
    kv_ms = kv_step / kv_bw * 1e3
    w_ms = w_step / wr_bw * 1e3
    compute_ms = (mm_step / mm_rate + attn_step / attn_rate) * 1e3
    overhead_ms = eff.step_overhead_ms + batch * eff.step_overhead_ms_per_seq

    def prefill(cached: int) -> Prefill:
        new = context - cached
        mm = 2 * new * linear_params + 2 * head_params  # logits for the last prompt token only
        attn = attn_per_pair * (new * cached + new * (new + 1) / 2)  # causal
        mm_s, attn_s = mm / (tp * mm_rate), attn / (tp * attn_rate)
        mem_s = w_step / wr_bw + context * kv_token_gpu / kv_bw
        return Prefill(new, cached, mm, attn, mm_s, attn_s, mem_s, max(mm_s + attn_s, mem_s))

    return Plan(
        model=m.name,
        gpu=gpu,
        tp=tp,
        weights=weights,
        kv=kv,
        block_size=block_size,
        context=context,
        batch=batch,
        prefix_cached=prefix_cached,
        efficiency=eff,
        gpu_memory_utilization=gpu_memory_utilization,
        window=m.window,
        weight_read_tbps=wr_bw / 1e12,
        kv_read_tbps=kv_bw / 1e12,
        matmul_tflops=mm_rate / 1e12,
        attention_tflops=attn_rate / 1e12,
        kv_bytes_per_token=kv_token,
        kv_bytes_per_request=context * kv_token,
        weight_bytes=wb.resident,
        weight_bytes_per_gpu=weights_gpu,
        reserve_bytes_per_gpu=reserve,
        kv_budget_bytes_per_gpu=budget,
        max_concurrent_requests=fit,
        kv_bytes_read_per_step_per_gpu=kv_step,
        weight_bytes_read_per_step_per_gpu=w_step,
        kv_read_ms_per_step=kv_ms,
        weight_read_ms_per_step=w_ms,
        decode_flops_per_step_per_gpu=mm_step + attn_step,
        decode_compute_ms_per_step=compute_ms,
        step_overhead_ms=overhead_ms,
        tpot_ms=max(kv_ms + w_ms, compute_ms) + overhead_ms,
        prefill=prefill(prefix_cached),
        prefill_uncached=prefill(0),
    )


def compare(p: Plan, measured: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each measured figure (a to_dict key, e.g. tpot_ms, ttft_s) beside its prediction, with the
    relative error (predicted - measured) / measured."""
    pred = p.to_dict()
    out = {}
    for key, value in measured.items():
        if not isinstance(pred.get(key), int | float) or isinstance(pred[key], bool):
            raise ValueError(f"{key!r} is not a predicted figure")
        out[key] = {
            "predicted": pred[key],
            "measured": value,
            "error": (pred[key] - value) / value,
        }
    return out

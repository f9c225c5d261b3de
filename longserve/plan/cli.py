"""`longserve plan`: the cost of serving a model at a context on a GPU, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from longserve.config import EngineConfig
from longserve.kv.quant import KV_FORMATS
from longserve.models.weights import WEIGHT_FORMATS
from longserve.plan.cost import DEFAULT_GPU_MEMORY_UTILIZATION, Plan, load_config, plan
from longserve.plan.hardware import (
    GPUS,
    MEASURED_EFFICIENCY,
    Efficiency,
    default_efficiency,
    engine_efficiency,
    get_gpu,
)

# Efficiency field -> (flag, what it is)
_EFF_FLAGS = {
    "weight_read": ("--weight-read-eff", "share of the weight-read bandwidth reached"),
    "kv_read": ("--kv-read-eff", "share of the KV-read bandwidth reached on bf16/fp16 KV"),
    "kv_read_fp8": ("--kv-read-fp8-eff", "share of the KV-read bandwidth reached on fp8 KV"),
    "kv_read_int4": ("--kv-read-int4-eff", "share of the KV-read bandwidth reached on int4 KV"),
    "matmul_bf16": ("--matmul-bf16-eff", "share of the bf16 tensor rate (bf16, int4 weights)"),
    "matmul_fp8": ("--matmul-fp8-eff", "share of the fp8 tensor rate (fp8 weights)"),
    "attention": ("--attention-eff", "share of the causal prefill attention rate (bf16 KV)"),
    "attention_fp8": ("--attention-fp8-eff", "share of the causal prefill attention rate, fp8 KV"),
    "attention_tma": (
        "--attention-tma-eff",
        "share of the causal prefill attention rate, bf16 KV in pages of 64+ tokens",
    ),
    "attention_tma_fp8": (
        "--attention-tma-fp8-eff",
        "share of the causal prefill attention rate, fp8 KV in pages of 64+ tokens",
    ),
    "step_overhead_ms": ("--step-overhead-ms", "host time added to every decode step, ms"),
    "step_overhead_ms_per_seq": (
        "--step-overhead-ms-per-seq",
        "host time added to a decode step per sequence in it, ms",
    ),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict KV memory, TPOT, TTFT and concurrency for a model at a context on a GPU",
        description="Price a model at a context on a GPU: KV bytes, decode bandwidth, prefill "
        "FLOPs, predicted TPOT and TTFT, and how many requests fit. GB = 10^9 bytes, "
        "GiB = 2^30 bytes, TB/s = 10^12 bytes/s. By default it prices this engine: its "
        "kernels' measured share of the GPU's ceilings and its per-step host overhead, "
        "calibrated on the H200 (docs/planning.md); --ceilings prices the hardware alone. "
        "TP communication is not modelled.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a bundled config name, an HF folder with config.json, or a .gguf file",
    )
    p.add_argument(
        "--gpu",
        required=True,
        help=f"a GPU of the table ({', '.join(GPUS)}) or a JSON file with the same fields",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    p.add_argument(
        "--weights",
        default="bf16",
        choices=list(WEIGHT_FORMATS),
        help="format of the decoder's linear layers (embeddings and lm_head stay bf16)",
    )
    p.add_argument(
        "--kv",
        default="bf16",
        choices=sorted(k for k in KV_FORMATS if k != "auto"),
        help="KV cache format (int4 carries a float16 scale and zero per group of channels)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens each request holds in KV, prompt and output (default: the model's window)",
    )
    p.add_argument(
        "--batch", type=int, default=1, help="requests decoding together at that context"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=EngineConfig.block_size,
        help="tokens per KV block, as the engine's flag: pages of 64+ tokens price the prefill's "
        "attention at the engine's TMA kernel (bf16/fp16 or fp8 KV); decode prices the same in "
        "every page size",
    )
    p.add_argument(
        "--prefix-cached",
        type=int,
        default=0,
        help="leading tokens found in the prefix cache, shared by all requests",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        help="share of HBM for weights and KV, as the engine takes it; the rest is the "
        "activation and runtime reserve",
    )
    p.add_argument(
        "--ceilings",
        action="store_true",
        help="price at the GPU's ceilings (measured ones as they are, datasheet ones derated as "
        "the H200 measured) without this engine's calibration: no kernel shortfall, no host "
        "overhead",
    )
    eng = engine_efficiency()
    for name, (flag, what) in _EFF_FLAGS.items():
        p.add_argument(
            flag,
            dest=name,
            type=float,
            default=None,
            help=f"{what}; overrides the default (this engine on a measured GPU: "
            f"{getattr(eng, name):.3g}; --ceilings: {getattr(Efficiency(), name):g} on a measured "
            f"GPU, {getattr(MEASURED_EFFICIENCY, name):.3g} on a datasheet one)",
        )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gpu = get_gpu(args.gpu)
    given = {k: getattr(args, k) for k in _EFF_FLAGS}
    eff = default_efficiency(gpu, engine=not args.ceilings)
    eff = replace(eff, **{k: v for k, v in given.items() if v is not None})
    p = plan(
        load_config(args.model),
        gpu,
        tp=args.tp,
        weights=args.weights,
        kv=args.kv,
        context=args.context,
        batch=args.batch,
        prefix_cached=args.prefix_cached,
        efficiency=eff,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
    )
    print(json.dumps(p.to_dict()) if args.json else table(p))
    return 0


def _bytes(n: float) -> str:
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"


def table(p: Plan) -> str:
    """The breakdown a person reads: memory, one decode step, one prefill."""
    g, e, pre, full = p.gpu, p.efficiency, p.prefill, p.prefill_uncached
    kind = "measured ceilings" if g.measured else "datasheet"
    rows = [
        f"{p.model} on {p.tp} x {g.name} ({kind}), weights {p.weights}, KV {p.kv} in blocks of "
        f"{p.block_size}, context {p.context:,}, batch {p.batch}, prefix cached {p.prefix_cached:,}",
        "units: GB = 10^9 bytes, GiB = 2^30 bytes, TB/s = 10^12 bytes/s, "
        "TFLOP = 10^12 FLOP, PFLOP = 10^15 FLOP",
        "efficiencies: " + ", ".join(f"{k} {v:.3g}" for k, v in asdict(e).items()),
    ]
    if p.context > p.window:
        rows.append(f"note: context {p.context:,} is past the model's window {p.window:,}")
    mem = [
        ("KV per token", f"{p.kv_bytes_per_token:,} B ({p.kv_bytes_per_token / 2**10:,.1f} KiB)"),
        ("KV per request", _bytes(p.kv_bytes_per_request)),
        ("weights", f"{_bytes(p.weight_bytes)}; per GPU {_bytes(p.weight_bytes_per_gpu)}"),
        (
            "reserve per GPU",
            f"{_bytes(p.reserve_bytes_per_gpu)}; "
            f"{1 - p.gpu_memory_utilization:.0%} of {g.hbm_gb:g} GB",
        ),
        ("KV budget per GPU", _bytes(p.kv_budget_bytes_per_gpu)),
        (
            "max concurrent requests",
            f"{p.max_concurrent_requests} at {p.context:,} tokens"
            + ("" if p.batch <= p.max_concurrent_requests else f" (batch {p.batch} does not fit)"),
        ),
    ]
    decode = [
        (
            "KV read",
            f"{_bytes(p.kv_bytes_read_per_step_per_gpu)} / "
            f"{p.kv_read_tbps:.2f} TB/s = {p.kv_read_ms_per_step:.2f} ms",
        ),
        (
            "weight read",
            f"{_bytes(p.weight_bytes_read_per_step_per_gpu)} / "
            f"{p.weight_read_tbps:.2f} TB/s = {p.weight_read_ms_per_step:.2f} ms",
        ),
        (
            "compute",
            f"{p.decode_flops_per_step_per_gpu / 1e12:,.3f} TFLOP = "
            f"{p.decode_compute_ms_per_step:.2f} ms",
        ),
        ("host overhead", f"{p.step_overhead_ms:.2f} ms"),
        ("TPOT", f"{p.tpot_ms:.2f} ms (the larger of reads and compute, plus the host's)"),
    ]
    prefill = [
        (
            "matmul",
            f"{pre.matmul_flops / 1e15:,.3f} PFLOP / ({p.tp} x {p.matmul_tflops:,.0f} TFLOP/s) "
            f"= {pre.matmul_s:,.3f} s",
        ),
        (
            "attention (causal)",
            f"{pre.attention_flops / 1e15:,.3f} PFLOP / ({p.tp} x {p.attention_tflops:,.0f} TFLOP/s) "
            f"= {pre.attention_s:,.3f} s",
        ),
        ("reads (weights + KV)", f"{pre.memory_s:,.3f} s"),
        ("TTFT", f"{pre.ttft_s:,.3f} s (the larger of compute and reads)"),
    ]
    if pre.cached_tokens:
        prefill.append(
            (
                "TTFT without prefix cache",
                f"{full.ttft_s:,.3f} s ({full.matmul_flops / 1e15:,.3f} + "
                f"{full.attention_flops / 1e15:,.3f} PFLOP)",
            )
        )
    blocks = [
        ("memory", mem),
        (f"decode step, batch {p.batch}, per GPU", decode),
        (f"prefill of {pre.new_tokens:,} tokens after {pre.cached_tokens:,} cached", prefill),
    ]
    width = max(len(k) for _, b in blocks for k, _ in b) + 2
    for title, block in blocks:
        rows += ["", title] + [f"  {k:<{width}}{v}" for k, v in block]
    rows += ["", f"GPU figures: {g.source}"]
    return "\n".join(rows)

"""TTFT and TPOT at long context under tensor parallelism, beside the planner's prediction.

The run it is for: a synthetic Llama-3.3-70B in bf16 over 2 (or 4, 8) H200s, fp8 KV, 128K:

    timeout 570 env PYTHONPATH=. python3 benchmarks/tp_bench.py --tp 2 --out $OUT/tp2.json

Each rank draws its own slice of the random weights on its GPU (nothing is carried). The CPU
path (gloo) is the same code on a small model: --model smollm2-135m --num-layers 2 --context 256.
The JSON is rewritten as each phase ends, so a run cut short still says how far it got.

What it does, prefix caching off: a short warm-up request; a probe request of one prefill chunk
whose prefill step and first decode step run under the profiler (share of GPU time in NCCL
kernels, the input to the sequence-parallelism question in docs/tensor_parallel.md); then
`batch` requests of `context - output_tokens` random prompt tokens, each generating
`output_tokens` tokens. TTFT is the first request's arrival to first token (its chunked
prefill); TPOT is the median step time while all of them decode. The planner prices the same
model, GPU count, formats, context and batch (longserve.plan.cost), and the JSON holds both.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace

import torch

from benchmarks.common import environment, write
from longserve import EngineConfig, LLMEngine, SamplingParams
from longserve.models.registry import resolve

# NVLink multicast stays off on shared hosts (the device README says why); spawned ranks inherit.
for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.3-70b", help="bundled config (synthetic weights)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (GPUs)")
    p.add_argument("--context", type=int, default=131072, help="prompt + output tokens")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens each request generates")
    p.add_argument("--batch", type=int, default=1, help="requests decoding together")
    p.add_argument("--kv-cache-dtype", default="fp8_e4m3")
    p.add_argument("--kv-scale", default="per_head", choices=["per_tensor", "per_head"])
    p.add_argument(
        "--kv-fallback",
        action="store_true",
        help="if the engine does not take --kv-cache-dtype, run with auto and say so",
    )
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill chunk")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu", default="h200-measured", help="the planner's GPU entry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--out", required=True, help="JSON result path")
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace, result: dict) -> EngineConfig:
    bs = args.block_size
    cfg = dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        tensor_parallel_size=args.tp,
        synthetic_weights=resolve(args.model).kind == "config",
        num_layers=args.num_layers,
        max_model_len=args.context,
        block_size=bs,
        num_kv_blocks=args.batch * math.ceil(args.context / bs) + 8,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_scale=args.kv_scale,
        seed=args.seed,
        max_num_seqs=args.batch + 1,  # the probe and the batch: no graphs for sizes never run
        enforce_eager=args.enforce_eager,
    )
    try:
        return EngineConfig(**cfg)
    except ValueError as e:
        if not args.kv_fallback:
            raise
        result["kv_fallback"] = f"{args.kv_cache_dtype} refused ({e}); ran with auto"
        return EngineConfig(**dict(cfg, kv_cache_dtype="auto"))


def run(engine: LLMEngine, prompts: list[list[int]], out_tokens: int, profile: bool = False):
    """Serve the prompts to the end, timing each step; profile the first of each kind if asked."""
    sp = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    reqs = [engine.add_request({"prompt_token_ids": p}, sp) for p in prompts]
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    profiles: dict[str, dict] = {}
    while engine.has_unfinished():
        decoding = all(r.output_token_ids for r in reqs) and not any(r.finished for r in reqs)
        kind = "decode" if decoding else "prefill"
        if profile and kind not in profiles:
            profiles[kind] = profiled_step(engine)
            continue
        t = time.perf_counter()
        engine.step()
        times[kind].append(time.perf_counter() - t)
    return reqs, times, profiles


def profiled_step(engine: LLMEngine) -> dict:
    """One engine step under the profiler: GPU kernel time, the NCCL share, the largest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if engine.cfg.torch_device.type != "cuda":
        engine.step()
        return {"note": "kernel times are measured on CUDA only"}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
    try:
        events = prof.key_averages()  # CPU ops carry their kernels' time too: count kernels only
        kernels = [
            (e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA
        ]
    except Exception as e:  # a profiler that fails to report costs the figure, not the run
        return {"error": f"{type(e).__name__}: {e}"}
    kernels.sort(key=lambda k: -k[1])
    total = sum(t for _, t in kernels)
    nccl = sum(t for k, t in kernels if "nccl" in k.lower())
    return {
        "gpu_kernel_ms": round(total / 1e3, 3),
        "nccl_ms": round(nccl / 1e3, 3),
        "nccl_share": round(nccl / total, 4) if total else None,
        "top_kernels_ms": [[k[:120], round(t / 1e3, 3)] for k, t in kernels[:12]],
    }


def predict(engine: LLMEngine, args: argparse.Namespace) -> tuple[object, dict]:
    """The planner's plan for this run (same model, GPUs, formats, context, batch) and its figures."""
    from longserve.plan.cost import plan

    kv = engine.cfg.kv_cache_dtype
    if kv == "auto":
        kv = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(engine.cfg.torch_dtype, "bf16")
    p = plan(
        replace(engine.model_config, name=args.model),
        args.gpu,
        tp=args.tp,
        weights="bf16",
        kv=kv,
        context=args.context,
        batch=args.batch,
    )
    d = p.to_dict()
    keys = ("tpot_ms", "ttft_s", "kv_read_ms_per_step", "weight_read_ms_per_step")
    return p, {
        "planner_args": {"gpu": args.gpu, "tp": args.tp, "weights": "bf16", "kv": kv},
        "predicted": {k: d[k] for k in keys},
    }


def measure(engine: LLMEngine, args: argparse.Namespace, result: dict) -> None:
    cfg, m, kv = engine.cfg, engine.model_config, engine.kv
    result["engine"] = {
        "model": args.model,
        "num_layers": m.num_layers,
        "dtype": str(cfg.torch_dtype),
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "kv_scale": cfg.kv_scale,
        "kv_bytes_per_token_rank0": kv.bytes_per_token,
        "kv_storage_dtype": str(kv.dtype),
        "kv_layout": engine.tp.kv_layout if engine.tp else None,
        "num_kv_blocks": kv.num_blocks,
        "block_size": cfg.block_size,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "cuda_graphs": engine.runner.graphs is not None,
    }
    try:
        plan, result["prediction"] = predict(engine, args)
    except (ImportError, ValueError) as e:
        plan, result["prediction"] = None, {"error": f"{type(e).__name__}: {e}"}
    write(args.out, result)  # each phase is saved as it ends: a run cut short still says why
    gen = torch.Generator().manual_seed(args.seed)

    def ids(n: int) -> list[int]:
        return torch.randint(m.vocab_size, (n,), generator=gen).tolist()

    chunk = min(cfg.max_num_batched_tokens, args.context - 2)
    run(engine, [ids(min(512, chunk))], 4)  # warm-up: first kernels, allocator
    _, _, profiles = run(engine, [ids(chunk)], 3, profile=True)
    result["probe"] = {"prompt_tokens": chunk, "profiles": profiles}
    write(args.out, result)

    prompt = args.context - args.output_tokens
    reqs, times, _ = run(engine, [ids(prompt) for _ in range(args.batch)], args.output_tokens)
    ttft = [r.metrics.ttft for r in reqs]
    dec = times["decode"]
    tpot = statistics.median(dec) if dec else None
    result["measured"] = {
        "prompt_tokens": prompt,
        "output_tokens": args.output_tokens,
        "batch": args.batch,
        "ttft_s": round(ttft[0], 4),
        "ttft_s_each": [round(x, 4) for x in ttft],
        "prefill_steps": len(times["prefill"]),
        "prefill_tokens_per_s": round(prompt * args.batch / sum(times["prefill"]), 1),
        "decode_steps": len(dec),
        "tpot_ms": round(tpot * 1e3, 3) if tpot else None,
        "tpot_ms_mean": round(statistics.mean(dec) * 1e3, 3) if tpot else None,
        "output_tokens_per_s": round(args.batch / tpot, 2) if tpot else None,
    }
    if cfg.torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        result["measured"]["max_memory_gib_rank0"] = round(peak, 2)
    if plan is not None:
        from longserve.plan.cost import compare

        figures = {"ttft_s": ttft[0]} | ({"tpot_ms": tpot * 1e3} if tpot else {})
        result["prediction"]["vs_measured"] = compare(plan, figures)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result: dict = {"environment": environment(), "args": vars(args)}
    if torch.cuda.is_available():
        result["environment"]["gpus"] = torch.cuda.device_count()
    engine, status = None, 0
    try:
        cfg = engine_config(args, result)
        write(args.out, result)
        t = time.perf_counter()
        engine = LLMEngine(cfg)
        result["load_s"] = round(time.perf_counter() - t, 2)
        measure(engine, args, result)
    except Exception:  # the JSON says what failed, and so does the exit status
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
        status = 1
    write(args.out, result)
    if engine is not None:
        engine.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())

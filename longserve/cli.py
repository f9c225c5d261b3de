"""`longserve plan|generate|serve|eval|bench|report`: each subcommand lives with its part."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from longserve.config import EngineConfig

# subcommand -> module with register(subparsers) that adds it and sets func
SUBCOMMANDS = {
    "generate": "longserve.cli",
    "plan": "longserve.plan.cli",
    "bench": "longserve.bench.cli",
    "report": "longserve.bench.report",
    "serve": "longserve.serve.cli",
    "eval": "longserve.eval.cli",
}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    d = EngineConfig()
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=d.model,
        help="smollm2-135m (embedded), a bundled config name, a .gguf file or an HF folder",
    )
    g.add_argument(
        "--dtype",
        default=d.dtype,
        help="weights and activations: auto (bf16 on CUDA, float32 on CPU), float32, bfloat16",
    )
    g.add_argument(
        "--weights",
        default=d.weights,
        choices=["auto", "bf16", "fp16", "fp8", "int4"],
        help="decoder linear weights: auto (as loaded), bf16/fp16 (the model dtype), fp8"
        " (e4m3, channel scales), int4 (group 128); fp8 and int4 quantize float weights at load",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output; defaults to the model's window",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=d.block_size,
        help="tokens per KV block (a power of two; on Hopper, pages of 64+ tokens in a bf16/fp16"
        " or fp8 cache let prefill chunks read their context by TMA: 128 is the fastest for long"
        " prompts)",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV blocks to allocate (default: from --kv-cache-memory-gb or GPU memory)",
    )
    g.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=d.kv_cache_memory_gb,
        help="KV cache size on the CPU, GiB",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="fraction of GPU memory the engine may use (weights + KV)",
    )
    g.add_argument(
        "--max-num-seqs", type=int, default=d.max_num_seqs, help="most requests running at once"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="token budget of one step (prefill chunks + decodes)",
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=d.enable_chunked_prefill,
        help="split long prompts across steps",
    )
    g.add_argument(
        "--max-num-partial-prefills",
        type=int,
        default=d.max_num_partial_prefills,
        help="most prompts mid-prefill at once",
    )
    g.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=d.long_prefill_token_threshold,
        help="largest chunk one prefill takes per step (0: no cap)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse KV blocks of shared prompt prefixes",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default=d.kv_cache_dtype,
        help="KV storage: auto (model dtype), bf16, fp16, fp8_e4m3, fp8_e5m2, int4",
    )
    g.add_argument(
        "--kv-scale",
        default=d.kv_scale,
        choices=["per_tensor", "per_head"],
        help="fp8 scale granularity: one per layer, or one per layer and KV head",
    )
    g.add_argument(
        "--kv-int4-group-size",
        type=int,
        default=d.kv_int4_group_size,
        help="int4 KV: channels per scale and zero point: a multiple of 4 dividing head_dim, within "
        "or made of quarters of the head (at head_dim 128: 4, 8, 16, 32, 64 or 128). Smaller "
        "groups track outliers better; decode on the H200 at 128K takes 0.32x bf16's time at 64, "
        "0.39x at 32, 0.42x at 128 and 1.3x at 16 (docs/kernels.md)",
    )
    g.add_argument(
        "--kv-calibration-text",
        default=None,
        help="fp8 KV: a text file to calibrate the scales on (default: the bundled text);"
        " scales are cached next to the model and reused",
    )
    g.add_argument(
        "--synthetic-weights",
        action="store_true",
        help="random weights of the real shape (for bundled configs; speed work only)",
    )
    g.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers")
    g.add_argument(
        "--rope-scaling",
        type=json.loads,
        default=None,
        help='override rope_scaling, e.g. \'{"rope_type":"yarn","factor":2,'
        '"original_max_position_embeddings":8192}\'',
    )
    g.add_argument("--tokenizer", default=None, help="an HF tokenizer folder to use instead")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=d.tensor_parallel_size,
        help="GPUs (or CPU processes) to split the model over",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying CUDA graphs",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="engine seed (sampling, synthetic weights)"
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = EngineConfig.field_names()
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text for one prompt",
        description="Generate from one prompt with the offline engine.",
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest (-1: all)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(p)
    p.set_defaults(func=generate)


def generate(args: argparse.Namespace) -> int:
    from longserve import LLM, SamplingParams
    from longserve.tokenizer import chat_prompt

    t0 = time.time()
    llm = LLM(**vars(engine_config(args)))
    load_s = time.time() - t0
    prompt = chat_prompt(llm.get_tokenizer(), args.prompt) if args.chat else args.prompt
    sp = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    out = llm.generate(prompt, sp, use_tqdm=False)[0]
    c, m = out.outputs[0], out.metrics
    timings = {
        "load_s": round(load_s, 3),
        "ttft_s": round(m.ttft, 4),
        "total_s": round(m.finished_time - m.arrival_time, 4),
        "prompt_tokens": len(out.prompt_token_ids),
        "output_tokens": len(c.token_ids),
    }
    if len(c.token_ids) > 1:
        timings["tpot_s"] = round(
            (m.finished_time - m.first_token_time) / (len(c.token_ids) - 1), 5
        )
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                    "timings": timings,
                }
            )
        )
    else:
        print(c.text)
        print(f"[{c.finish_reason}; {timings}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="longserve", description="Serve and validate LLMs at 128K-token context."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

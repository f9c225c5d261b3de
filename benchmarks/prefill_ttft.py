"""Time to first token of one long prompt by KV format and block size, end to end on CUDA.

A synthetic-weight Llama-3.3-70B (random weights of the real shape, all 80 layers, fp8 linears)
on one H200 prefills a prompt of --tokens in chunks of --budget tokens, prefix cache off, one
output token. Its first chunk is a whole prompt (causal_prefill); every later chunk attends over
the pages before it: paged_extend on pages of 16 tokens, paged_prefill (TMA, a page a key tile)
on pages of 128. Each configuration gets its own engine and a warm-up prompt
of a chunk and a bit (every kernel compiled) before the timed one. Writes JSON after each.

    python benchmarks/prefill_ttft.py --out ttft.json [--tokens 131000] [--configs auto:16,...]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.common import environment, write
from longserve import LLM, SamplingParams


def ttft(llm: LLM, tokens: int, vocab: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=gen).tolist()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n    python")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--model", default="llama-3.3-70b", help="model name (synthetic weights)")
    p.add_argument("--tokens", type=int, default=131000, help="prompt length of the timed run")
    p.add_argument("--budget", type=int, default=8192, help="tokens per step (chunk size)")
    p.add_argument(
        "--configs",
        default="auto:16,auto:128,fp8_e4m3:16",
        help="comma-separated kv_cache_dtype:block_size pairs, run in this order",
    )
    args = p.parse_args()
    result = {"environment": environment(), "model": args.model, "tokens": args.tokens}
    result["runs"] = []
    for item in args.configs.split(","):
        kv, bs = item.split(":")
        llm = LLM(
            model=args.model,
            synthetic_weights=True,
            weights="fp8",
            dtype="bfloat16",
            kv_cache_dtype=kv,
            block_size=int(bs),
            max_model_len=max(args.tokens, args.budget + 512) + 8,
            max_num_batched_tokens=args.budget,
            enable_prefix_caching=False,
        )
        vocab = llm.engine.model_config.vocab_size
        ttft(llm, args.budget + 512, vocab, seed=1)  # a whole chunk and a later one: compiled
        run = {"kv_cache_dtype": kv, "block_size": int(bs), "chunk_budget": args.budget}
        run["ttft_s"] = ttft(llm, args.tokens, vocab, seed=2)
        print(run, flush=True)
        result["runs"].append(run)
        write(args.out, result)
        del llm
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Prefill and decode speed of the embedded model on this CPU: longserve vs HF transformers.

Both run in the same process on the same weights (the GGUF, dequantized) and the same token ids:
prefill tokens/s at each length (median of 3 after a warm-up) and decode tokens/s for one
stream after a 4K-token prompt.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import environment, median_time, write
from longserve import LLM, SamplingParams
from longserve.models.registry import embedded_gguf


def ours(dtype: str, lengths: list[int], decode_prompt: int, decode_tokens: int, ids: list[int]):
    llm = LLM(dtype=dtype, enable_prefix_caching=False, num_kv_blocks=1024, seed=0)
    sp1 = SamplingParams(temperature=0, max_tokens=1)
    out = {"prefill_tok_s": {}}
    for n in lengths:
        t = median_time(
            lambda n=n: llm.generate({"prompt_token_ids": ids[:n]}, sp1, use_tqdm=False)
        )
        out["prefill_tok_s"][n] = round(n / t, 1)
    spd = SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True)
    rates = []
    for _ in range(2):
        r = llm.generate({"prompt_token_ids": ids[:decode_prompt]}, spd, use_tqdm=False)[0]
        rates.append(decode_tokens / (r.metrics.finished_time - r.metrics.first_token_time))
    out["decode_tok_s"] = round(max(rates), 2)
    return out


@torch.inference_mode()
def transformers_peer(dtype: str, lengths, decode_prompt: int, decode_tokens: int, ids):
    from transformers import AutoModelForCausalLM

    path = embedded_gguf()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=tdtype
    )
    model.eval()
    out = {"prefill_tok_s": {}}
    for n in lengths:
        x = torch.tensor([ids[:n]])
        t = median_time(lambda x=x: model(x, use_cache=False, logits_to_keep=1))
        out["prefill_tok_s"][n] = round(n / t, 1)
    rates = []
    for _ in range(2):
        o = model(torch.tensor([ids[:decode_prompt]]), use_cache=True, logits_to_keep=1)
        past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            o = model(tok, past_key_values=past, use_cache=True)
            past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        rates.append(decode_tokens / (time.perf_counter() - t))
    out["decode_tok_s"] = round(max(rates), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--decode-prompt", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        help="model dtypes to run; bfloat16 is several times slower on CPUs without bf16 units",
    )
    ap.add_argument("--out", default="benchmarks/results/foundation_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (max(args.lengths + [args.decode_prompt]),)).tolist()
    result = {"env": environment(), "model": "smollm2-135m (Q4_1 GGUF, dequantized)", "runs": {}}
    for dtype in args.dtypes:
        a = ours(dtype, args.lengths, args.decode_prompt, args.decode_tokens, ids)
        b = transformers_peer(dtype, args.lengths, args.decode_prompt, args.decode_tokens, ids)
        ratio = {n: round(a["prefill_tok_s"][n] / b["prefill_tok_s"][n], 2) for n in args.lengths}
        result["runs"][dtype] = {
            "longserve": a,
            "transformers": b,
            "prefill_ratio": ratio,
            "decode_ratio": round(a["decode_tok_s"] / b["decode_tok_s"], 2),
        }
        print(dtype, result["runs"][dtype], flush=True)
        result["env"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        write(args.out, result)  # after each dtype: a long run keeps what it measured


if __name__ == "__main__":
    main()

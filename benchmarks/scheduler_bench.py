"""Scheduler benchmarks on the CPU with the embedded model.

(1) Prefix cache: a 6K-token shared prefix followed by a 100-token turn. TTFT of the first
    request (cold) and of a second one with another 100-token turn, prefix caching on and off;
    each repeat uses a new prefix, so every first request is cold.
(2) Chunked prefill: a 4K-token prompt arrives at t=0 and 100-token requests arrive at even
    intervals while it prefills (spread over the long prompt's own prefill time, measured first).
    p50/p99 TTFT of the short requests and the long request's TTFT, with chunked prefill off and
    with budgets 256/1024/4096, each with no per-request chunk cap (long_prefill_token_threshold
    0, first come first served) and with the cap at half the budget.

Prompts are deterministic, varied English sentences from a seeded template generator (no
external text), tokenized and cut to exact lengths. float32 by default: on a CPU without AMX or
AVX512-BF16, bfloat16 matmuls are several times slower than float32 ones. OpenMP threads wait
passively (OMP_WAIT_POLICY=PASSIVE unless set): on a shared 2-core machine, spinning threads
make every step several times slower. Run it alone on the machine:
    flock /tmp/longserve-bench.lock .venv/bin/python -m benchmarks.scheduler_bench
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import torch  # noqa: E402

from benchmarks.common import environment, write  # noqa: E402
from longserve import LLM, SamplingParams  # noqa: E402

SUBJECTS = [
    "The harbour master",
    "An old clockmaker",
    "The village council",
    "A travelling merchant",
    "The youngest sister",
    "The night watchman",
    "A retired sailor",
    "The schoolteacher",
    "A curious fox",
    "The miller's son",
]
VERBS = [
    "remembered",
    "described",
    "questioned",
    "carried",
    "repaired",
    "discovered",
    "ignored",
    "painted",
    "measured",
    "followed",
]
OBJECTS = [
    "a letter from the capital",
    "the broken lantern",
    "the northern road",
    "seven silver coins",
    "the winter harvest",
    "a map of the coast",
    "the bells of the chapel",
    "an unfinished song",
    "the flooded meadow",
    "the price of bread",
]
CLAUSES = [
    "before the storm arrived",
    "while the market was closing",
    "as the tide turned",
    "long after midnight",
    "on the first day of spring",
    "because nobody else would",
    "without saying a word",
    "in front of the whole town",
]


def prose(seed: int, n_sentences: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CLAUSES)}"
        if rng.random() < 0.3:
            s += f", in the year {rng.randint(1650, 1899)}"
        out.append(s + ".")
    return " ".join(out)


def token_ids(llm: LLM, seed: int, n: int) -> list[int]:
    """Exactly n tokens of prose (a sentence is ~14 tokens)."""
    ids = llm.get_tokenizer().encode(prose(seed, n // 8 + 2), add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


def ttft(llm: LLM, ids: list[int]) -> tuple[float, int]:
    sp = SamplingParams(temperature=0, max_tokens=1)
    out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
    return out.metrics.ttft, out.num_cached_tokens


def prefix_cache(args: argparse.Namespace) -> dict:
    res = {}
    for caching in (True, False):
        llm = LLM(
            dtype=args.dtype, num_kv_blocks=args.kv_blocks, enable_prefix_caching=caching, seed=0
        )
        ttft(llm, token_ids(llm, 999, 64))  # warm-up
        first, second, cached = [], [], []
        for rep in range(args.reps):
            prefix = token_ids(llm, 1000 + rep, args.prefix_tokens)
            a, _ = ttft(llm, prefix + token_ids(llm, 2000 + rep, args.turn_tokens))
            b, c = ttft(llm, prefix + token_ids(llm, 3000 + rep, args.turn_tokens))
            first.append(a)
            second.append(b)
            cached.append(c)
        stats = llm.engine.stats()
        res["on" if caching else "off"] = {
            "ttft_first_s": round(statistics.median(first), 3),
            "ttft_second_s": round(statistics.median(second), 3),
            "ttft_first_all_s": [round(x, 3) for x in first],
            "ttft_second_all_s": [round(x, 3) for x in second],
            "second_num_cached_tokens": cached,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
        }
        del llm
        gc.collect()
    on, off = res["on"], res["off"]
    res["speedup_second_vs_first_on"] = round(on["ttft_first_s"] / on["ttft_second_s"], 1)
    res["speedup_second_on_vs_off"] = round(off["ttft_second_s"] / on["ttft_second_s"], 1)
    print("prefix cache", res, flush=True)
    return res


def mixed(
    llm: LLM, long_ids: list[int], shorts: list[list[int]], arrivals: list[float], max_tokens: int
) -> tuple[float, list[float]]:
    """Long prompt at t=0, short ones at their arrival times; the engine steps in between and a
    short request's arrival time is when it arrived, even if a step was running then."""
    eng = llm.engine
    t0 = time.time()
    long = eng.add_request(
        {"prompt_token_ids": long_ids}, SamplingParams(temperature=0, max_tokens=1)
    )
    long.metrics.arrival_time = t0
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    pending, reqs = list(zip(arrivals, shorts, strict=True)), []
    while pending or eng.has_unfinished():
        while pending and pending[0][0] <= time.time() - t0:
            at, ids = pending.pop(0)
            r = eng.add_request({"prompt_token_ids": ids}, sp)
            r.metrics.arrival_time = t0 + at
            reqs.append(r)
        if eng.has_unfinished():
            eng.step()
        else:
            time.sleep(0.001)
    return long.metrics.ttft, [r.metrics.ttft for r in reqs]


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (with under 100 samples, p99 is the largest)."""
    return sorted(xs)[math.ceil(q / 100 * len(xs)) - 1]


def chunked(args: argparse.Namespace) -> dict:
    configs = [("off", {"enable_chunked_prefill": False})]
    for b in args.budgets:
        configs.append((f"{b}", {"max_num_batched_tokens": b}))
        configs.append(
            (
                f"{b}/cap{b // 2}",
                {"max_num_batched_tokens": b, "long_prefill_token_threshold": b // 2},
            )
        )
    res, arrivals = {}, None
    for name, kw in configs:
        llm = LLM(
            dtype=args.dtype,
            num_kv_blocks=args.kv_blocks,
            enable_prefix_caching=False,
            seed=0,
            **kw,
        )
        ttft(llm, token_ids(llm, 999, 64))  # warm-up
        long_ids = token_ids(llm, 4000, args.long_tokens)
        shorts = [token_ids(llm, 5000 + i, args.short_tokens) for i in range(args.num_shorts)]
        if arrivals is None:  # spread arrivals over the long prompt's own unchunked prefill
            alone = statistics.median(ttft(llm, long_ids)[0] for _ in range(2))
            arrivals = [(i + 0.5) * alone / args.num_shorts for i in range(args.num_shorts)]
            res["long_alone_ttft_s"] = round(alone, 3)
        long_t, short_t = [], []
        for _ in range(args.reps):
            lt, st = mixed(llm, long_ids, shorts, arrivals, args.short_max_tokens)
            long_t.append(lt)
            short_t += st
        res[name] = {
            "short_ttft_p50_s": round(pct(short_t, 50), 3),
            "short_ttft_p99_s": round(pct(short_t, 99), 3),
            "long_ttft_s": round(statistics.median(long_t), 3),
            "num_short_samples": len(short_t),
            "settings": kw,
        }
        print(name, res[name], flush=True)
        del llm
        gc.collect()
    res["short_arrivals_s"] = [round(a, 3) for a in arrivals]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefix-tokens", type=int, default=6000)
    ap.add_argument("--turn-tokens", type=int, default=100)
    ap.add_argument("--long-tokens", type=int, default=4096)
    ap.add_argument("--short-tokens", type=int, default=100)
    ap.add_argument("--num-shorts", type=int, default=16)
    ap.add_argument("--short-max-tokens", type=int, default=8)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/scheduler_cpu.json")
    args = ap.parse_args()
    result = {
        "env": environment(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "model": "smollm2-135m (Q4_1 GGUF, dequantized)",
        "dtype": args.dtype,
        "prompts": "seeded template generator of varied English sentences, cut to exact token counts",
        "args": vars(args),
        "prefix_cache": prefix_cache(args),
        "chunked_prefill": chunked(args),
    }
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out, result)


if __name__ == "__main__":
    main()

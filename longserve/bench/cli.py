"""`longserve bench prefix|chat|mixed`: the lab's workloads, offline or against --server URL."""

from __future__ import annotations

import argparse
import json

from longserve.cli import add_engine_args, engine_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a lab workload",
        description="Run a lab workload against the offline engine or a server.",
    )
    kinds = p.add_subparsers(dest="workload", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--server",
            default=None,
            help="base URL of a running longserve server (default: offline engine)",
        )
        q.add_argument(
            "--served-model",
            default="",
            help="model name to send to the server (default: the server's)",
        )
        q.add_argument("--bench-seed", type=int, default=0, help="seed of the workload's tokens")
        q.add_argument("--out", default=None, help="write the result JSON here too")
        add_engine_args(q)
        q.set_defaults(func=run)

    q = kinds.add_parser("prefix", help="long document then a short turn: prefix cache on vs off")
    q.add_argument("--doc-tokens", type=int, default=6000, help="shared document length")
    q.add_argument("--turn-tokens", type=int, default=100, help="user turn length")
    common(q)
    q = kinds.add_parser("chat", help="continuous chat-shape load with Poisson arrivals")
    q.add_argument("--num-requests", type=int, default=32, help="requests to send")
    q.add_argument("--rate", type=float, default=2.0, help="arrivals per second (0: all at once)")
    q.add_argument("--mean-context", type=int, default=1024, help="mean prompt length in tokens")
    q.add_argument("--output-tokens", type=int, default=64, help="tokens generated per request")
    q.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    common(q)
    q = kinds.add_parser("mixed", help="90%% short / 10%% long prompts under several chunk budgets")
    q.add_argument("--num-requests", type=int, default=40, help="requests to send")
    q.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    q.add_argument("--short-tokens", type=int, default=128, help="short prompt length")
    q.add_argument("--long-tokens", type=int, default=4096, help="long prompt length")
    q.add_argument("--output-tokens", type=int, default=16, help="tokens generated per request")
    q.add_argument(
        "--budgets",
        nargs="+",
        default=["off", "256", "1024", "1024/512", "4096"],
        help="chunk budgets to sweep: N (max_num_batched_tokens), N/C (and at most C tokens of "
        "one prompt a step, --long-prefill-token-threshold), or 'off' (no chunking)",
    )
    common(q)


def run(args: argparse.Namespace) -> int:
    from longserve.bench import runs

    if args.server:
        import urllib.request

        with urllib.request.urlopen(f"{args.server.rstrip('/')}/v1/models") as r:
            info = json.load(r)["data"][0]
        target, model = args.server, args.served_model or info["id"]
        vocab, max_len = 32000, info.get("max_model_len") or 8192
    else:
        from longserve.engine.llm import LLMEngine

        target = LLMEngine(engine_config(args))
        model, vocab, max_len = "", target.model_config.vocab_size, target.max_model_len
    seed = args.bench_seed
    if args.workload == "prefix":
        result = runs.prefix_cache_ttft(
            target, args.doc_tokens, args.turn_tokens, vocab, model, seed
        )
    elif args.workload == "chat":
        result = runs.chat_load(
            target,
            args.num_requests,
            args.rate,
            args.mean_context,
            args.output_tokens,
            args.max_concurrency,
            vocab,
            max_len,
            model,
            seed,
        )
    else:
        result = runs.mixed_sweep(
            target,
            args.budgets,
            args.num_requests,
            args.rate,
            args.short_tokens,
            args.long_tokens,
            args.output_tokens,
            vocab,
            model,
            seed,
        )
    from longserve.bench.env import environment

    result = {"env": environment(), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0

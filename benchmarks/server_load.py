"""Bounded load test of `longserve serve` on loopback: many concurrent streaming requests, a share
of them cancelled (after 1-3 chunks of text, or by a 0-2 s timer); it stops by itself.

It starts the server as a subprocess, fires all requests at once, then checks that every request
that was not cancelled finished with exactly max_tokens tokens (ignore_eos) and its usage, that the
engine is idle with no KV block in use afterwards, and that the server still answers. Figures go
to a JSON file with the machine, versions and command.

    flock /tmp/longserve-bench.lock .venv/bin/python benchmarks/server_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PREAMBLE = (
    "You are answering questions for a geography quiz. Keep every answer short and factual, "
    "name the country or city, and add one sentence of context. "
)
QUESTIONS = [
    "What is the capital of France?",
    "Which river flows through Cairo?",
    "What is the tallest mountain in Africa?",
    "Name the largest desert in Asia.",
    "Which ocean lies west of Portugal?",
    "What is the capital of Japan?",
    "Which country has the city of Marrakesh?",
    "Name a lake on the border of Peru and Bolivia.",
]


@dataclass
class Outcome:
    kind: str  # ok | cancelled | error
    ttft: float | None = None
    tokens: int = 0
    detail: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(base: str) -> dict[str, float]:
    """/metrics samples by name (a KV block's state appended in brackets), summed over labels."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=60).text):
        for s in fam.samples:
            key = s.name + (f"[{s.labels['state']}]" if "state" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


async def one(
    client: httpx.AsyncClient, i: int, rng: random.Random, args: argparse.Namespace
) -> Outcome:
    """One streaming request; cancelled ones stop reading after a few chunks or a short wait."""
    chat = i % 2 == 1
    q = QUESTIONS[i % len(QUESTIONS)]
    max_tokens = rng.randint(args.min_tokens, args.max_tokens)
    body = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": q}]
    else:
        body["prompt"] = f"{PREAMBLE}\nQuestion: {q}\nAnswer:"
    cancel = rng.random() < args.cancel_frac
    stop_after = rng.randint(1, 3) if cancel and rng.random() < 0.5 else None
    wait = rng.uniform(0.0, 2.0) if cancel and stop_after is None else None
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()

    async def run() -> Outcome:
        ttft, chunks, usage, finish, done = None, 0, None, None, False
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Outcome("error", detail=f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    return Outcome("error", detail=str(ev["error"]))
                usage = ev.get("usage") or usage
                for c in ev["choices"]:
                    text = c["delta"].get("content") if chat else c["text"]
                    if text and ttft is None:
                        ttft = time.perf_counter() - t0
                    if text:
                        chunks += 1
                    finish = c["finish_reason"] or finish
                if stop_after is not None and chunks >= stop_after:
                    return Outcome("cancelled", ttft, detail="mid-stream")
        if not done or finish != "length" or usage["completion_tokens"] != max_tokens:
            return Outcome("error", ttft, detail=f"done={done} finish={finish} usage={usage}")
        return Outcome("ok", ttft, usage["completion_tokens"])

    try:
        return await (run() if wait is None else asyncio.wait_for(run(), wait))
    except TimeoutError:
        return Outcome("cancelled", detail="timer")
    except httpx.HTTPError as e:
        return Outcome("error", detail=repr(e))


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def machine() -> dict:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    out = {"python": platform.python_version(), "torch": torch.__version__, "git_commit": commit}
    for pkg in ("longserve", "fastapi", "uvicorn", "httpx", "transformers"):
        out[pkg] = version(pkg)
    return out


async def drive(base: str, args: argparse.Namespace) -> tuple[list[Outcome], float]:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.requests + 10)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(client, i, rng, args)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout)
        for t in pending:
            t.cancel()
        outs = [
            t.result() if t in done else Outcome("error", detail="past --timeout") for t in tasks
        ]
        return outs, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="concurrent streaming requests")
    p.add_argument("--cancel-frac", type=float, default=0.25, help="share of them cancelled")
    p.add_argument("--min-tokens", type=int, default=8, help="least max_tokens of a request")
    p.add_argument("--max-tokens", type=int, default=24, help="most max_tokens of a request")
    p.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--server-args",
        default="--dtype float32 --num-kv-blocks 4096 --max-num-seqs 256",
        help="engine flags for `longserve serve`",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/server_load_cpu.json"))
    args = p.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "longserve.cli", "serve", "--model", args.model]
    server_cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    server_cmd += args.server_args.split()
    info = {"machine": machine(), "versions": versions()}
    server = subprocess.Popen(server_cmd, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not come up (exit code {server.poll()})")
            time.sleep(0.5)

        outs, wall = asyncio.run(drive(base, args))
        idle_deadline = time.time() + 120
        while True:
            m = scrape(base)
            idle = m["longserve:num_requests_running"] + m["longserve:num_requests_waiting"] == 0
            if idle or time.time() > idle_deadline:
                break
            time.sleep(0.5)
        after = httpx.post(
            f"{base}/v1/completions",
            json={"model": args.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        healthy = httpx.get(f"{base}/health", timeout=30).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()

    ttfts = [o.ttft for o in outs if o.kind == "ok"]
    count = {k: sum(o.kind == k for o in outs) for k in ("ok", "cancelled", "error")}
    results = {
        "requests": args.requests,
        "completed": count["ok"],
        "cancelled": count["cancelled"],
        "cancelled_after_chunks": sum(o.detail == "mid-stream" for o in outs),
        "cancelled_by_timer": sum(o.detail == "timer" for o in outs),
        "errors": count["error"],
        "error_samples": [o.detail for o in outs if o.kind == "error"][:5],
        "wall_s": round(wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
        "tokens_completed": sum(o.tokens for o in outs),
        "completed_tokens_per_s": round(sum(o.tokens for o in outs) / wall, 1),
        "server_finished_requests": m.get("longserve:request_success_total", 0),
        "server_generated_tokens": m.get("longserve:generation_tokens_total", 0),
        "running_after": m["longserve:num_requests_running"],
        "waiting_after": m["longserve:num_requests_waiting"],
        "blocks_in_use_after": m["longserve:kv_cache_blocks[in_use]"],
        "kv_cache_usage_after": m["longserve:kv_cache_usage_perc"],
        "prefix_cache_hit_rate": round(
            m["longserve:prefix_cache_hits_total"]
            / max(1, m["longserve:prefix_cache_queries_total"]),
            3,
        ),
        "next_request_status": after.status_code,
        "healthy_after": healthy,
        "server_exit_code": server.returncode,
    }
    exe = Path(sys.executable)
    exe = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
    record = {
        "benchmark": "server_load",
        **info,
        "command": " ".join([str(exe), *sys.argv]),
        "server_command": " ".join([str(exe), *server_cmd[1:]]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    ok = (
        count["error"] == 0
        and results["blocks_in_use_after"] == 0
        and results["running_after"] == 0
        and after.status_code == 200
        and healthy
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

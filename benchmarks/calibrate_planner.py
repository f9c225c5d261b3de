"""Fit the planner's engine calibration to the engine's own H200 measurements, then check it.

The planner prices a model at the ceilings measured on the H200 (plan/hardware.py). This engine
reaches a share of them: its Triton kernels run below cuDNN's attention and SDPA's decode, its
linears carry elementwise work and (under TP) all-reduces, and each decode step costs the host a
few milliseconds. Each share is fitted from one committed measurement, and the rows no fit used
check the result:

- attention: the engine's extend kernel over cuDNN's SDPA, 128K causal prefill, same run;
- attention_tma: the warp-specialized TMA kernel's chunk over a 128K context in pages of 128,
  over the same cuDNN figure (the rate chunked prefill runs at with --block-size 128; above 1:
  the kernel outruns cuDNN's whole-prompt rate there);
- kv_read, kv_read_fp8, kv_read_int4: the engine's decode kernel in each format over SDPA on bf16
  KV, KV bytes per second, 128K, median over batches 1/8/32, same run (the Gluon kernel, which
  takes every format on Hopper);
- step_overhead_ms (+ _per_seq x batch): the embedded 135M model's decode steps with CUDA graphs
  at batch 1 and 32, less the planner's GPU time for them (its weights read in 0.07 ms: nearly
  all host);
- matmul_fp8: the 131K-token prefill of Llama-3.3-70B in fp8 with bf16 KV in pages of 16 (the
  kernels whose attention share is above), measured in the session of the kernel run;
- attention_fp8: the same prefill with fp8 KV, given that matmul share (its extend kernel
  dequantizes, and runs slower than the bf16 one);
- attention_tma_fp8: attention_fp8 times the TMA kernel's rate over paged extend's on fp8 pages
  (pages of 128 against 16, a chunk over 128K, side by side in one run);
- matmul_bf16: the 128K prefill of Llama-3.3-70B in bf16 at TP=2 (the eager run), with fp8 KV
  and the shares above (its all-reduces are folded in; an earlier session's run).

The TTFTs in pages of 128 then check the TMA shares end to end.

Writes longserve/data/engine_h200.json (what the planner loads) and prints the predicted-vs-
measured table before (ceilings) and after (calibrated) for docs/planning.md:
    .venv/bin/python -m benchmarks.calibrate_planner
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from longserve.ops.triton.kv import extend_config
from longserve.plan.cost import load_config, plan
from longserve.plan.hardware import ENGINE_CALIBRATION, Efficiency, get_gpu

SOURCES = {  # the committed measurements, relative to the repository root
    "triton": "benchmarks/results/triton_h200.json",
    "ttft": "benchmarks/results/prefill_ttft_h200.json",
    "ttft_128": "benchmarks/results/prefill_ttft_h200_warp.json",
    "chunk_fp8": "benchmarks/results/triton_h200_chunk_warp.json",
    "ttft_fp8_warp": "benchmarks/results/prefill_ttft_h200_fp8_warp.json",
    "prefix": "benchmarks/results/prefix_h200_llama70b_fp8.json",
    "tp2": "benchmarks/results/tp2_llama70b_128k_eager.json",
    "tp2_graphs": "benchmarks/results/tp2_llama70b_128k.json",
    "report": "reports/h200/results.json",
}
GPU = get_gpu("h200-measured")


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def kernel_shares(triton: dict) -> dict:
    """attention and KV-read shares of the engine's kernels against the peers in the same run."""
    pre = next(r for r in triton["prefill"] if r["context"] == 131072)
    name = "bm{BM}_bn{BN}_w{num_warps}_s{num_stages}".format(**extend_config(128, 8))
    attention = pre["configs"][name]["tflop_s"] / pre["cudnn"]["tflop_s"]
    chunk = next(r for r in triton["chunk"] if r["context"] == 131072)
    tma = chunk["paged_prefill_bs128"]["tflop_s"] / pre["cudnn"]["tflop_s"]
    rows = [r for r in triton["decode"] if r["context"] == 131072]
    sdpa = {r["batch"]: r["kv_bytes"] / r["sdpa_ms"] for r in rows if r["format"] == "bf16"}
    shares: dict[str, list[float]] = {}
    for r in rows:  # "ms": the engine's default launch
        shares.setdefault(r["format"], []).append(r["kv_bytes"] / r["ms"] / sdpa[r["batch"]])
    med = {k: statistics.median(v) for k, v in shares.items()}
    return {
        "attention": attention,
        "attention_tma": tma,
        "kv_read": med["bf16"],
        "kv_read_fp8": med["fp8_e4m3"],
        "kv_read_int4": med["int4"],
        "per_batch": {k: [round(x, 3) for x in v] for k, v in shares.items()},
    }


def step_overhead(e2e: dict, ceil: Efficiency) -> tuple[float, float]:
    """(fixed ms, ms per sequence) from the 135M model's graph decode at batch 1 and 32."""
    run = e2e["smollm2-135m"]
    cfg = load_config("smollm2-135m")
    ctx = run["prompt_tokens"] + run["new_tokens"] // 2
    over = {}
    for b in (1, 32):
        step_ms = 1e3 * b / run[f"graphs_b{b}_tok_s"]
        gpu_ms = plan(cfg, GPU, context=ctx, batch=b, efficiency=ceil).tpot_ms
        over[b] = step_ms - gpu_ms
    per_seq = (over[32] - over[1]) / 31
    return over[1] - per_seq, per_seq


def matmul_share(cfg, tp: int, weights: str, kv: str, ctx: int, ttft: float, eff: Efficiency):  # noqa: ANN001
    """The matmul share that makes the planner's TTFT equal the measured one."""
    full = plan(cfg, GPU, tp, weights, kv, ctx, efficiency=eff).prefill
    key = "matmul_fp8" if weights == "fp8" else "matmul_bf16"
    return getattr(eff, key) * full.matmul_s / (ttft - full.attention_s)


def attention_share(cfg, weights: str, kv: str, ctx: int, ttft: float, eff: Efficiency):  # noqa: ANN001
    """The attention share of a KV format that makes the planner's TTFT equal the measured one
    (pages of 16: the paged extend kernel's share)."""
    full = plan(cfg, GPU, 1, weights, kv, ctx, efficiency=eff, block_size=16).prefill
    return eff.attention_for(kv, 16) * full.attention_s / (ttft - full.matmul_s)


def rows(eff: Efficiency, data: dict) -> list[dict]:
    """Every measurement the planner can be held against, with the planner's figure."""
    llama70, llama8 = load_config("llama-3.3-70b"), load_config("llama-3.1-8b")
    pre, tp2, e2e, rep = data["prefix"], data["tp2"], data["triton"]["e2e"], data["report"]
    doc, turn = pre["doc_tokens"], pre["turn_tokens"]

    def p70(**kw):  # noqa: ANN202
        return plan(llama70, GPU, 1, "fp8", "fp8_e4m3", doc + turn, efficiency=eff, **kw)

    # the runs in pages of 128 again, on the warp-specialized kernel: the later ones count
    runs = data["ttft"]["runs"] + data["ttft_128"]["runs"] + data["ttft_fp8_warp"]["runs"]
    ttft = {(r["kv_cache_dtype"], r["block_size"]): r for r in runs}
    tokens = data["ttft"]["tokens"]

    def long(kv: str, block_size: int = 16) -> float:
        return plan(
            llama70, GPU, 1, "fp8", kv, tokens, efficiency=eff, block_size=block_size
        ).prefill.ttft_s

    out = [
        (
            "TTFT, 131K-token prompt, 70B fp8, bf16 KV, pages of 16 (s)",
            long("bf16"),
            ttft["auto", 16]["ttft_s"],
            "prefill_ttft_h200.json",
            "fit: matmul_fp8",
        ),
        (
            "TTFT, same, pages of 128 (s)",
            long("bf16", 128),
            ttft["auto", 128]["ttft_s"],
            "prefill_ttft_h200_warp.json",
            "check",
        ),
        (
            "TTFT, same, fp8 KV, pages of 16 (s)",
            long("fp8_e4m3"),
            ttft["fp8_e4m3", 16]["ttft_s"],
            "prefill_ttft_h200.json",
            "fit: attention_fp8",
        ),
        (
            "TTFT, same, fp8 KV, pages of 128 (s)",
            long("fp8_e4m3", 128),
            ttft["fp8_e4m3", 128]["ttft_s"],
            "prefill_ttft_h200_fp8_warp.json",
            "check",
        ),
        (
            "TTFT, 101K-token prompt, 70B fp8 + fp8 KV (s)",
            p70().prefill.ttft_s,
            pre["cache_off"]["first_ttft_s"],
            "prefix_h200_llama70b_fp8.json",
            "check (earlier kernels)",
        ),
        (
            "TTFT, same, 100K prefix cached (s)",
            p70(prefix_cached=doc).prefill.ttft_s,
            pre["cache_on"]["second_ttft_s"],
            "prefix_h200_llama70b_fp8.json",
            "check",
        ),
        (
            "TTFT, same, uncached, lab report run (s)",
            p70().prefill.ttft_s,
            rep["speed"]["prefix"]["cache_off"]["first_ttft_s"],
            "reports/h200/results.json",
            "check (earlier kernels)",
        ),
        (
            "TTFT, same, cached, lab report run (s)",
            p70(prefix_cached=doc).prefill.ttft_s,
            rep["speed"]["prefix"]["cache_on"]["second_ttft_s"],
            "reports/h200/results.json",
            "check",
        ),
        (
            "TTFT, 131K-token prompt, 70B bf16, TP=2 (s)",
            plan(llama70, GPU, 2, "bf16", "fp8_e4m3", 131072, efficiency=eff).prefill.ttft_s,
            tp2["measured"]["ttft_s"],
            "tp2_llama70b_128k_eager.json",
            "fit: matmul_bf16",
        ),
    ]
    for model, cfg in (("smollm2-135m", load_config("smollm2-135m")), ("llama-3.1-8b", llama8)):
        run = e2e[model]
        ctx = run["prompt_tokens"] + run["new_tokens"] // 2
        for b in (1, 32):
            use = "fit: step overhead" if model == "smollm2-135m" else "check"
            out.append(
                (f"TPOT, {model} bf16, batch {b}, CUDA graphs (ms)",
                 plan(cfg, GPU, context=ctx, batch=b, efficiency=eff).tpot_ms,
                 1e3 * b / run[f"graphs_b{b}_tok_s"], "triton_h200.json e2e", use)
            )  # fmt: skip
    tp2_plan = plan(llama70, GPU, 2, "bf16", "fp8_e4m3", 131072, efficiency=eff)
    graphs = data["tp2_graphs"]["measured"]
    out += [
        ("TTFT, 131K-token prompt, 70B bf16, TP=2, CUDA-graph run (s)", tp2_plan.prefill.ttft_s, graphs["ttft_s"],
         "tp2_llama70b_128k.json", "repeat of the fit"),
        ("TPOT, 70B bf16, TP=2, batch 1 at 128K, CUDA graphs (ms)", tp2_plan.tpot_ms,
         graphs["tpot_ms"], "tp2_llama70b_128k.json", "check"),
        ("TPOT, same, eager (ms)", tp2_plan.tpot_ms, tp2["measured"]["tpot_ms"],
         "tp2_llama70b_128k_eager.json", "outside the model: eager"),
    ]  # fmt: skip
    return [
        {
            "figure": f,
            "predicted": round(p, 4),
            "measured": round(m, 4),
            "error_pct": round(100 * (m - p) / p, 1),
            "source": src,
            "use": use,
        }
        for f, p, m, src, use in out
    ]


def markdown(before: list[dict], after: list[dict]) -> str:
    lines = [
        "| figure | measured | ceilings | error | engine-calibrated | error | row is |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, a in zip(before, after, strict=True):
        lines.append(
            f"| {a['figure']} | {a['measured']:g} | {b['predicted']:.3g} | {b['error_pct']:+.0f}% "
            f"| {a['predicted']:.3g} | {a['error_pct']:+.0f}% | {a['use']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ENGINE_CALIBRATION), help="calibration JSON to write")
    args = ap.parse_args()
    data = {k: load(path) for k, path in SOURCES.items()}
    ceil = Efficiency()
    k = kernel_shares(data["triton"])
    fixed, per_seq = step_overhead(data["triton"]["e2e"], ceil)
    eff = Efficiency(
        kv_read=k["kv_read"],
        kv_read_fp8=k["kv_read_fp8"],
        kv_read_int4=k["kv_read_int4"],
        attention=k["attention"],
        attention_tma=k["attention_tma"],
        step_overhead_ms=fixed,
        step_overhead_ms_per_seq=per_seq,
    )
    llama70 = load_config("llama-3.3-70b")
    tp2, tokens = data["tp2"], data["ttft"]["tokens"]
    ttft = {(r["kv_cache_dtype"], r["block_size"]): r["ttft_s"] for r in data["ttft"]["runs"]}
    fp8 = matmul_share(llama70, 1, "fp8", "bf16", tokens, ttft["auto", 16], eff)
    eff = replace(eff, matmul_fp8=fp8)
    attn8 = attention_share(llama70, "fp8", "fp8_e4m3", tokens, ttft["fp8_e4m3", 16], eff)
    chunk = next(r for r in data["chunk_fp8"]["chunk"] if r["context"] == 131072)
    gain = chunk["paged_prefill_fp8_bs128"]["tflop_s"] / chunk["paged_extend_fp8_bs16"]["tflop_s"]
    eff = replace(eff, attention_fp8=attn8, attention_tma_fp8=attn8 * gain)
    bf16 = matmul_share(llama70, 2, "bf16", "fp8_e4m3", 131072, tp2["measured"]["ttft_s"], eff)
    eff = replace(eff, matmul_bf16=bf16)
    eff = Efficiency(**{f: round(v, 4) for f, v in asdict(eff).items()})
    before, after = rows(ceil, data), rows(eff, data)
    result = {
        "about": "This engine's share of the h200-measured ceilings and its per-step host cost, "
        "fitted by benchmarks/calibrate_planner.py; plan/hardware.py applies it by default.",
        "efficiency": asdict(eff),
        "decode_kernel_share_by_batch_1_8_32": k["per_batch"],
        "sources": list(SOURCES.values()),
        "rows_at_ceilings": before,
        "rows_calibrated": after,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(asdict(eff), indent=1))
    print(markdown(before, after))


if __name__ == "__main__":
    main()

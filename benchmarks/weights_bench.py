"""Weight precision on the H200: 70B-layer linears at batch 1/8/32/64, bf16 vs fp8 vs int4.

Shapes of Llama-3.3-70B (hidden 8192, MLP 28672, 64 query and 8 KV heads of 128): qkv, o_proj,
gate or up, down, and the fused gate+up of the 57344x8192 bf16 GEMV in shared/GPU.md.
  bf16  F.linear (cuBLAS), the peer every ratio is taken against
  fp8   Fp8Linear: per-token e4m3 activations (one Triton launch) + torch._scaled_mm row-wise
  int4  Int4Linear's kernels (ops/triton/w4a16.py) in every configuration listed below, each
        checked against the float32 product with the same dequantized weight; the fastest correct
        one is reported beside the engine's default dispatch
  tinygemm  torch._weight_int4pack_mm (group 128, bf16 scales and zeros), where this torch has it
Times are medians of CUDA-event timings with the L2 flushed before each call (triton do_bench);
effective TB/s = bytes of weight the format holds (models/weights.linear_bytes) / time.
Kernels are compiled first in parallel worker processes (Triton's disk cache) so that compiling
does not eat the device time. One prefill-sized point (M = 2048) shows the dequantize + cuBLAS path.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import environment, write
from longserve.models.weights import linear_bytes
from longserve.ops.quant_linear import Fp8Linear, Int4Linear, dequantize_int4, fp8_rows

SHAPES = {  # name: (out_features N, in_features K)
    "qkv": (10240, 8192),
    "o_proj": (8192, 8192),
    "gate|up": (28672, 8192),
    "down": (8192, 28672),
    "gate+up": (57344, 8192),
}
BATCHES = [1, 8, 32, 64]
ONLY_BATCH1 = {"gate+up"}
PREFILL = ("gate|up", 2048)
GEMV_CONFIGS = [  # STAGES: loads software-pipelined by tl.range (1: not pipelined)
    {"BLOCK_N": 64, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 1, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 4, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 1, "SPLIT_K": 1, "STAGES": 4, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 32, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 32, "GROUPS": 4, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 32, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 4, "num_warps": 2, "ASM": True},
    {"BLOCK_N": 128, "GROUPS": 1, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 128, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 3, "num_warps": 8, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 2, "SPLIT_K": 2, "STAGES": 3, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 1, "SPLIT_K": 2, "STAGES": 4, "num_warps": 4, "ASM": True},
    {"BLOCK_N": 64, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": False},
]
MM_CONFIGS = [  # each tried at every BLOCK_M from 16 up to the one the batch needs
    {"BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3, "ASM": True},
    {"BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4, "ASM": True},
    {"BLOCK_N": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3, "ASM": True},
    {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3, "ASM": True},
    {"BLOCK_N": 32, "SPLIT_K": 2, "num_warps": 2, "num_stages": 4, "ASM": True},
    {"BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 2, "num_stages": 3, "ASM": True},
]
DEV = "cuda"
MAX_REL_ERR = 1e-2  # bf16 output rounding is ~4e-3 of the norm; an indexing bug is O(1)


def block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _compile(kind: str, cfg: dict) -> str:
    """Run one kernel configuration once on a small problem: Triton caches the binary on disk."""
    from longserve.ops.quant_linear import quantize_int4
    from longserve.ops.triton import fp8_act, w4a16

    try:
        n, k = 256, 1024
        w = torch.randn(n, k, device=DEV) * 0.02
        qw, s, z = quantize_int4(w)
        x = torch.randn(4, k, device=DEV, dtype=torch.bfloat16)
        if kind == "gemv":
            w4a16.gemv(x[:1], qw, s, z, k, **cfg)
        elif kind == "mm":
            w4a16.mm(x, qw, s, z, k, **cfg)
        elif kind == "dequant":
            w4a16.dequantize(qw, s, z, k, torch.bfloat16)
        else:
            fp8_act.quantize_rows(torch.randn(4, 8192, device=DEV, dtype=torch.bfloat16))
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 (reported, and the configuration is skipped later)
        return f"{type(e).__name__}: {e}"[:300]


def precompile() -> dict:
    jobs = [("gemv", c) for c in GEMV_CONFIGS]
    jobs += [("mm", {**c, "BLOCK_M": bm}) for bm in (16, 32, 64) for c in MM_CONFIGS]
    jobs += [("dequant", {}), ("fp8_act", {})]
    t = time.time()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=12, mp_context=ctx) as pool:
        status = list(pool.map(_compile, *zip(*jobs, strict=True)))
    print(f"precompiled {len(jobs)} kernels in {time.time() - t:.1f}s", flush=True)
    return {f"{kind} {cfg}": s for (kind, cfg), s in zip(jobs, status, strict=True) if s != "ok"}


def timed(fn) -> float:  # noqa: ANN001
    """Median ms of fn() with the L2 flushed before each call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def point(name: str, fmt: str, m: int, n: int, k: int, ms: float, **extra) -> dict:  # noqa: ANN003
    b = n * k * 2 if fmt in ("bf16",) else linear_bytes(n, k, "int4" if "int4" in fmt else fmt)
    return {
        "shape": name,
        "N": n,
        "K": k,
        "batch": m,
        "format": fmt,
        "ms": round(ms, 5),
        "weight_bytes": b,
        "tb_s": round(b / ms / 1e9, 3),
        **extra,
    }


def tinygemm(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):  # noqa: ANN201
    """torch's int4 mm (tinygemm) on q [N, K], scales and zeros [G, N]: its weight is
    (q - 8) * s + zero, so zero = (8 - z) * s."""
    if not hasattr(torch, "_weight_int4pack_mm"):
        return "torch._weight_int4pack_mm is missing"
    u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(u8, 8)
    sz = torch.stack([scales.float(), (8 - zeros.float()) * scales.float()], 2).to(torch.bfloat16)
    return lambda x: torch._weight_int4pack_mm(x, packed, 128, sz.contiguous())


def measure(name: str, fmt: str, x: torch.Tensor, n: int, k: int, fn, ref, **extra) -> dict:  # noqa: ANN001, ANN003
    """One timed point with its error against ref; a failure is recorded, not raised."""
    try:
        y = fn(x)
        err = {"rel_err": rel_err(y, ref), "max_abs_err": (y.float() - ref).abs().max().item()}
        row = point(name, fmt, x.shape[0], n, k, timed(lambda: fn(x)), **err, **extra)
        if fmt == "int4-config":
            row["ok"] = row["rel_err"] < MAX_REL_ERR
        return row
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"[:300]
        return {"shape": name, "batch": x.shape[0], "format": fmt, "error": err, **extra}


@torch.inference_mode()
def run_shape(name: str, n: int, k: int, batches: list[int], gen: torch.Generator) -> list[dict]:
    from longserve.ops.quant_linear import unpack_int4
    from longserve.ops.triton import w4a16

    out = []
    lin = nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
    lin.weight.normal_(0, 0.02, generator=gen)
    w = lin.weight
    f8, i4 = Fp8Linear.from_linear(lin), Int4Linear.from_linear(lin)
    w4 = dequantize_int4(i4.qweight, i4.scales, i4.zeros, k)  # float32 [N, K]
    try:
        tg = tinygemm(unpack_int4(i4.qweight)[:, :k], i4.scales, i4.zeros)
    except Exception as e:  # noqa: BLE001
        tg = f"{type(e).__name__}: {e}"[:300]
    for m in batches:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
        ref16 = x.float() @ w.float().t()
        out.append(measure(name, "bf16", x, n, k, lambda x: F.linear(x, w), ref16))
        xq, xs = fp8_rows(x)  # the fp8 reference: the same quantized operands, float32 product
        ref8 = (xq.float() @ f8.weight.float().t()) * xs[:, None] * f8.weight_scale
        out.append(measure(name, "fp8", x, n, k, f8, ref8))
        ref4 = x.float() @ w4.t()
        out.append(measure(name, "int4", x, n, k, i4, ref4, kernel="default"))
        out[-1]["rel_err_vs_bf16_weights"] = rel_err(i4(x), ref16)
        cands = [("gemv", c) for c in GEMV_CONFIGS] if m == 1 else []
        bms = [bm for bm in (16, 32, 64) if bm <= block_m(m)]
        cands += [("mm", {**c, "BLOCK_M": bm}) for bm in bms for c in MM_CONFIGS]
        for kind, cfg in cands:
            fn = w4a16.gemv if kind == "gemv" else w4a16.mm
            call = lambda x, fn=fn, cfg=cfg, q=i4: fn(x, q.qweight, q.scales, q.zeros, k, **cfg)  # noqa: E731
            out.append(measure(name, "int4-config", x, n, k, call, ref4, kernel=kind, config=cfg))
        if callable(tg):
            out.append(measure(name, "int4-tinygemm", x, n, k, tg, ref4))
        else:
            out.append({"shape": name, "batch": m, "format": "int4-tinygemm", "error": tg})
        print(f"{name} batch {m} done", flush=True)
    del lin, f8, i4, w4
    torch.cuda.empty_cache()
    return out


def best_int4(rows: list[dict], name: str, m: int) -> dict | None:
    ok = [
        r
        for r in rows
        if r["shape"] == name and r["batch"] == m and r["format"] == "int4-config" and r.get("ok")
    ]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def summary(rows: list[dict]) -> list[dict]:
    table = []
    for name in SHAPES:
        for m in sorted({r["batch"] for r in rows if r["shape"] == name and "batch" in r}):
            by = {
                r["format"]: r
                for r in rows
                if r["shape"] == name and r["batch"] == m and "error" not in r
            }
            if "bf16" not in by:
                continue
            bf = by["bf16"]["ms"]
            best = best_int4(rows, name, m)
            line = {
                "shape": name,
                "N": by["bf16"]["N"],
                "K": by["bf16"]["K"],
                "batch": m,
                "bf16_ms": bf,
                "bf16_tb_s": by["bf16"]["tb_s"],
                "fp8_ms": by.get("fp8", {}).get("ms"),
                "fp8_tb_s": by.get("fp8", {}).get("tb_s"),
                "int4_default_ms": by.get("int4", {}).get("ms"),
                "int4_best_ms": best["ms"] if best else None,
                "int4_best_tb_s": best["tb_s"] if best else None,
                "int4_best_kernel": f"{best['kernel']} {best['config']}" if best else None,
                "tinygemm_ms": by.get("int4-tinygemm", {}).get("ms"),
            }
            for key in ("fp8_ms", "int4_default_ms", "int4_best_ms", "tinygemm_ms"):
                if line[key]:
                    line[key.replace("_ms", "_over_bf16")] = round(line[key] / bf, 3)
            table.append(line)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/weights_h200.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs CUDA"
    t0 = time.time()
    compile_errors = precompile()
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows: list[dict] = []
    for name, (n, k) in SHAPES.items():
        try:
            rows += run_shape(name, n, k, [1] if name in ONLY_BATCH1 else BATCHES, gen)
        except Exception:  # noqa: BLE001 (keep the other shapes' numbers)
            rows.append({"shape": name, "error": traceback.format_exc()[-1500:]})
            print(rows[-1]["error"], flush=True)
    name, m = PREFILL
    n, k = SHAPES[name]
    with torch.inference_mode():
        lin = nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
        f8, i4 = Fp8Linear.from_linear(lin), Int4Linear.from_linear(lin)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
        w4 = dequantize_int4(i4.qweight, i4.scales, i4.zeros, k)
        rows.append(measure(name, "bf16", x, n, k, lin, x.float() @ lin.weight.float().t()))
        rows.append(measure(name, "fp8", x, n, k, f8, x.float() @ lin.weight.float().t()))
        rows.append(measure(name, "int4", x, n, k, i4, x.float() @ w4.t(), kernel="default"))
    table = summary(rows)
    result = {
        "benchmark": "weights_h200",
        "env": environment(),
        "device_name": torch.cuda.get_device_name(),
        "compile_errors": compile_errors,
        "max_rel_err_allowed": MAX_REL_ERR,
        "summary": table,
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
    }
    write(args.out, result)
    print(f"{'shape':9} {'M':>4} {'bf16 ms':>8} {'TB/s':>5} {'fp8 x':>6} {'int4 x':>6} "
          f"{'best x':>6} {'TB/s':>5} {'tiny x':>6}  best int4 kernel")  # fmt: skip
    for r in table:
        print(
            f"{r['shape']:9} {r['batch']:4d} {r['bf16_ms']:8.4f} {r['bf16_tb_s']:5.2f} "
            f"{r.get('fp8_over_bf16', float('nan')):6.3f} {r.get('int4_default_over_bf16', float('nan')):6.3f} "
            f"{r.get('int4_best_over_bf16', float('nan')):6.3f} {r['int4_best_tb_s'] or 0:5.2f} "
            f"{r.get('tinygemm_over_bf16', float('nan')):6.3f}  {r['int4_best_kernel']}"
        )
    print(f"wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

"""Launch-shape sweep of the paged decode kernel on CUDA (JSON out): what `decode_config` and
`num_splits` were chosen from (docs/kernels.md).

At five points of Llama-3.3-70B's layer shape (128K x batch 1/8/32, 16K x 8, 64K x 1), in bf16,
fp8 e4m3 and int4 (--formats): tiles of {64, 128, 256} keys x {2, 4, 8} warps x {2, 3, 4}
stages, each at the slice counts that give {2, 4, 8, 16} programs per SM, rounded up and rounded
down (slices of at least 256 tokens). Every entry records its slices and programs; medians of
do_bench. (5 stages, which int4 runs, came later from an A/B: docs/kernels.md.)

    python benchmarks/decode_sweep.py --out decode_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton
from triton.testing import do_bench

from benchmarks.common import environment, write
from benchmarks.triton_bench import BS, DEV, HKV, HQ, D, paged_cache
from longserve.ops.triton import paged_decode

POINTS = [(131072, 1), (131072, 8), (131072, 32), (16384, 8), (65536, 1)]
TILES = list(itertools.product((64, 128, 256), (2, 4, 8), (2, 3, 4)))  # keys, warps, stages


def slice_counts(batch: int, length: int, sms: int) -> list[int]:
    pairs = batch * HKV
    cap = triton.cdiv(length, 256)
    out = set()
    for waves in (2, 4, 8, 16):
        out.add(triton.cdiv(waves * sms, pairs))
        out.add(waves * sms // pairs)
    return sorted({max(1, min(s, cap)) for s in out})


def sweep_point(length: int, batch: int, sms: int, formats: list[str]) -> list[dict]:
    nb = length // BS
    table = torch.randperm(batch * nb, device=DEV).int().view(batch, nb)
    seq = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=DEV)
    rows = []
    for fmt in formats:
        kv, _ = paged_cache(fmt, batch * nb)
        for (bn, warps, stages), splits in itertools.product(
            TILES, slice_counts(batch, length, sms)
        ):
            run = partial(
                paged_decode, q, kv, table, seq, D**-0.5, length, splits, bn, warps, stages
            )
            try:
                ms = do_bench(run, warmup=10, rep=40, return_mode="median")
            except triton.runtime.errors.OutOfResources:
                ms = None  # the tile does not fit in shared memory
            rows.append(
                dict(fmt=fmt, L=length, B=batch, bn=bn, w=warps, st=stages, splits=splits,
                     programs=batch * HKV * splits, ms=ms)
            )  # fmt: skip
        best = min((r for r in rows if r["ms"] and r["fmt"] == fmt), key=lambda r: r["ms"])
        print(f"{fmt:9s} L={length} B={batch}: best {best}", flush=True)
        del kv
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument(
        "--formats", default="bf16,fp8_e4m3,int4", help="KV formats to sweep, comma-separated"
    )
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    formats = args.formats.split(",")
    rows = [r for length, batch in POINTS for r in sweep_point(length, batch, sms, formats)]
    write(args.out, {"environment": {**environment(), "sms": sms}, "rows": rows})


if __name__ == "__main__":
    main()

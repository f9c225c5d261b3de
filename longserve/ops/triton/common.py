"""Tile loaders shared by the attention kernels: one tile of paged K or V, dequantized.

Int4 tiles come back as two halves, the low nibbles (even channels) and the high nibbles (odd
channels), so that no kernel has to interleave them: q . k = q_even . k_lo + q_odd . k_hi, and
p @ v is written back to the even and odd output channels.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the interpreter runs no inline PTX


@triton.jit
def load_tile(X, row, nmask, d, dtype: tl.constexpr):
    """A [BN, D] bf16/fp16/fp8 tile at flat row offsets `row`, in `dtype` (no fp8 scale)."""
    x = tl.load(X + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
    return x.to(dtype)


@triton.jit
def load_int4_tile(
    X, XS, XZ, row, prow, nmask, j, dtype: tl.constexpr, HALF_GROUP: tl.constexpr, NG: tl.constexpr
):
    """Even and odd channels of an int4 tile, [BN, D/2] each: x = (q - zero) * scale per group."""
    x = tl.load(X + row[:, None] + j[None, :], mask=nmask[:, None], other=0)
    lo = (x & 15).to(tl.float32)
    hi = (x >> 4).to(tl.float32)
    grp = (j // HALF_GROUP)[None, :]
    sc = tl.zeros(lo.shape, tl.float32)
    zr = tl.zeros(lo.shape, tl.float32)
    for g in tl.static_range(NG):
        s_g = tl.load(XS + prow + g, mask=nmask, other=0.0).to(tl.float32)
        z_g = tl.load(XZ + prow + g, mask=nmask, other=0.0).to(tl.float32)
        sc = tl.where(grp == g, s_g[:, None], sc)
        zr = tl.where(grp == g, z_g[:, None], zr)
    return ((lo - zr) * sc).to(dtype), ((hi - zr) * sc).to(dtype)

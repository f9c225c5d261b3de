"""Tile loaders shared by the attention kernels: one tile of paged K or V, dequantized.

Int4 tiles come back as two halves, the low and the high nibbles of each byte, whose channels
int4_channels names (kv/quant.py's word layout), so that no kernel has to interleave them:
q . k = q_lo . k_lo + q_hi . k_hi, and p @ v is written back to those channels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the interpreter runs no inline PTX
# two 16-bit int4 words in one register -> four f16x2 pairs, nibble t of both words in pair t:
# four ANDs and a shift (nibbles 1 and 3 stay four bits up: 16 x the unit)
INT4_PHASES_PTX = tl.constexpr(
    """{ .reg .b32 t; and.b32 $0, $4, 0x000F000F; and.b32 $1, $4, 0x00F000F0;
    shr.b32 t, $4, 8; and.b32 $2, t, 0x000F000F; and.b32 $3, t, 0x00F000F0; }"""
)


@functools.cache
def hopper(device_index: int) -> bool:
    """Compiled for Hopper or later (TMA, programmatic dependent launch): asked once per device,
    not per step of every layer."""
    return not INTERPRET and torch.cuda.get_device_capability(device_index)[0] >= 9


@triton.jit
def load_tile(X, row, nmask, d, dtype: tl.constexpr):
    """A [BN, D] bf16/fp16/fp8 tile at flat row offsets `row`, in `dtype` (no fp8 scale)."""
    x = tl.load(X + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
    return x.to(dtype)


@triton.jit
def int4_channels(j, D: tl.constexpr):
    """Channels of the low and the high nibbles of int4 bytes j: byte 2c + i of a row holds
    channels c + 2i * D/4 and c + (2i + 1) * D/4."""
    lo = j // 2 + (j % 2) * (D // 2)
    return lo, lo + D // 4


@triton.jit
def load_int4_tile(
    X, XS, XZ, row, prow, nmask, j, dtype: tl.constexpr, D: tl.constexpr, QGS: tl.constexpr
):  # fmt: skip
    """Low and high nibbles of an int4 tile, [BN, D/2] each: x = (q - zero) * scale per group."""
    x = tl.load(X + row[:, None] + j[None, :], mask=nmask[:, None], other=0)
    ch_lo, ch_hi = int4_channels(j, D)
    g_lo = (ch_lo // QGS)[None, :]
    g_hi = (ch_hi // QGS)[None, :]
    sc_lo = tl.zeros(x.shape, tl.float32)
    zr_lo = tl.zeros(x.shape, tl.float32)
    sc_hi = tl.zeros(x.shape, tl.float32)
    zr_hi = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(D // QGS):
        s_g = tl.load(XS + prow + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
        z_g = tl.load(XZ + prow + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
        sc_lo = tl.where(g_lo == g, s_g, sc_lo)
        zr_lo = tl.where(g_lo == g, z_g, zr_lo)
        sc_hi = tl.where(g_hi == g, s_g, sc_hi)
        zr_hi = tl.where(g_hi == g, z_g, zr_hi)
    lo = ((x & 15).to(tl.float32) - zr_lo) * sc_lo
    hi = ((x >> 4).to(tl.float32) - zr_hi) * sc_hi
    return lo.to(dtype), hi.to(dtype)

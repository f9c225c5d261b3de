"""KV store: write new keys and values into their cache slots, quantizing on the way in.

One program per (token, KV head), computing exactly what kv/quant.py's reference writes: fp8
divides by the static scale and saturates at the format's largest finite value; int4 takes each
group's min and max with kv/quant.py's floors on the scale, rounds scale and zero to float16 first
and quantizes with the stored pair (round half up, clamped to 0..15). Negative slots are
skipped: the padding rows of a CUDA-graph batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.ops.triton.kv import FP8_MAX, INT4, PagedKV


@triton.jit
def _nibble(x):
    """Round half up, clamp to 0..15, as uint8."""
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), 0.0), 15.0).to(tl.uint8)


@triton.jit
def _store_one(
    X, C, CS, CZ, row, prow, sh_off, fp8_max,
    FMT: tl.constexpr, D: tl.constexpr, QGS: tl.constexpr,
):  # fmt: skip
    if FMT == 2:
        # [groups, group] in channel order for the statistics, then nibbles regrouped into the
        # words of kv/quant.py: word c holds channels c + j * D / 4, two a byte
        g = tl.arange(0, D // QGS)[:, None]
        x = tl.load(X + g * QGS + tl.arange(0, QGS)[None, :]).to(tl.float32)
        mn = tl.min(x, 1)
        mx = tl.max(x, 1)
        floor = tl.math.div_rn(tl.maximum(tl.abs(mn), tl.abs(mx)), 1024.0)
        scale = tl.maximum(tl.math.div_rn(mx - mn, 15.0), floor)
        scale = tl.minimum(tl.maximum(scale, 6.103515625e-05), 65504.0)
        scale = scale.to(tl.float16).to(tl.float32)
        zero = tl.minimum(tl.maximum(tl.math.div_rn(-mn, scale), -65504.0), 65504.0)
        zero = zero.to(tl.float16).to(tl.float32)
        q = _nibble(tl.math.div_rn(x, scale[:, None]) + zero[:, None])
        q = tl.reshape(tl.trans(tl.reshape(q, [4, D // 4])), [D // 4, 2, 2])  # [c, byte, nibble]
        lo, hi = tl.split(q)
        byte = 2 * tl.arange(0, D // 4)[:, None] + tl.arange(0, 2)[None, :]
        tl.store(C + row + byte, lo | (hi << 4))
        gg = tl.arange(0, D // QGS)
        tl.store(CS + prow + gg, scale.to(tl.float16))
        tl.store(CZ + prow + gg, zero.to(tl.float16))
    elif FMT == 1:
        d = tl.arange(0, D)
        x = tl.math.div_rn(tl.load(X + d).to(tl.float32), tl.load(CS + sh_off))
        x = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
        tl.store(C + row + d, x.to(C.dtype.element_ty))
    else:
        d = tl.arange(0, D)
        x = tl.load(X + d)
        if C.dtype.element_ty == tl.float16:
            x = tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0)
        tl.store(C + row + d, x.to(C.dtype.element_ty))


@triton.jit
def _store_kernel(
    KI, VI, SLOT, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, s_sh,
    s_kt, s_khd, s_vt, s_vhd, fp8_max,
    FMT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, QGS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOT + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BS
        off = slot % BS
        row = blk * s_kb + off * s_ks + h * s_kh
        prow = blk * s_pb + off * s_ps + h * s_ph
        sh = h * s_sh
        _store_one(KI + t * s_kt + h * s_khd, K, KS, KZ, row, prow, sh, fp8_max, FMT, D, QGS)
        _store_one(VI + t * s_vt + h * s_vhd, V, VS, VZ, row, prow, sh, fp8_max, FMT, D, QGS)


def store_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv: PagedKV) -> None:
    """k, v [T, kv_heads, head_dim] (model dtype) -> the cache at flat slots [T] (< 0: skipped)."""
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dim")
    t, heads, dim = k.shape
    if kv.fmt == INT4 and dim % kv.group_size:
        raise ValueError(f"head_dim {dim} is not a multiple of the int4 group {kv.group_size}")
    _store_kernel[(t, heads)](
        k, v, slots, *kv.kernel_args(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        FP8_MAX.get(kv.k.dtype, 0.0), FMT=kv.fmt, D=dim, BS=kv.block_size, QGS=kv.group_size,
    )  # fmt: skip

"""W4A16 on CUDA: bf16 activations times int4 weights (group 128, asymmetric), dequantized in
registers. Layout (ops/quant_linear.py packs it): qweight int32 [K_pad / 8, N]; nibble j of word
(16 g + r, n) is the weight of input k = 128 g + 16 j + r, so a group is 16 whole rows and each
nibble plane j meets a contiguous run of 16 activations.

Nibbles become numbers without int-to-float conversions (a quarter of the FMA rate on Hopper):
  gemv (M = 1, FMA in float32): a nibble moved to bits 8..11, 12..15 or 16..19 and OR-ed into the
    bits of 2^15, 2^11 or 2^7 reads as MAGIC + q exactly (the mantissa's unit there is 1); the
    sums (MAGIC + q) x accumulate in float32, and MAGIC * sum(x) and z * sum(x) come out once per
    group. Three planes share each shift.
  mm (small M, tl.dot): with ASM, one lop3 puts nibbles j and j + 4 into the low bits of a pair
    of bf16 128.0 and one sub.bf16x2 takes away 128 + z: two exact (q - z) operands per two
    instructions. Without ASM (Triton's interpreter, fp16) the same planes go through float32.
Prefill-sized M dequantizes to bf16 (`dequantize`) and runs cuBLAS. Split-K variants add float32
partial sums with atomics into a zeroed buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.ops.triton.common import INTERPRET

# Defaults picked from benchmarks/results/weights_h200.json (70B layer shapes on an H200): the
# configuration with the lowest total time over the shapes at each batch size.
GEMV = {"BLOCK_N": 32, "GROUPS": 2, "SPLIT_K": 1, "STAGES": 3, "num_warps": 4, "ASM": True}
GEMV_MAX_K = 16384  # past this (down_proj: K 28672, N 8192) the split-K mm was faster at M = 1
MM = {  # by BLOCK_M
    16: {"BLOCK_N": 32, "SPLIT_K": 2, "num_warps": 2, "num_stages": 4, "ASM": True},
    32: {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3, "ASM": True},
    64: {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3, "ASM": True},
}
DEQUANT_ABOVE = 64  # rows of x past which dequantize + cuBLAS is used (not tuned in 65..2047)


@triton.jit
def _gemv_plane(w, J: tl.constexpr, ASM: tl.constexpr):
    """Nibble plane J of the words as float32 MAGIC + q, exactly, MAGIC = _magic(J)."""
    if J < 2:  # planes 0, 1 to bits 12..19; 2..4 stay at 8..19; 5..7 come down to 8..19
        src = w << 12
    elif J < 5:
        src = w
    else:
        src = w >> 12
    if ASM:  # mask and OR in one lop3 (ptxas leaves them as two instructions)
        if J == 2 or J == 5:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x00000F00, 0x47000000, 0xEA;", "=r,r", [src], tl.float32, True, 1
            )
        elif J == 0 or J == 3 or J == 6:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x0000F000, 0x45000000, 0xEA;", "=r,r", [src], tl.float32, True, 1
            )
        else:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x000F0000, 0x43000000, 0xEA;", "=r,r", [src], tl.float32, True, 1
            )
    else:
        if J == 2 or J == 5:
            return ((src & 0xF00) | 0x47000000).to(tl.float32, bitcast=True)
        elif J == 0 or J == 3 or J == 6:
            return ((src & 0xF000) | 0x45000000).to(tl.float32, bitcast=True)
        else:
            return ((src & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _magic(J: tl.constexpr):
    """The float that _gemv_plane ORs plane J into: 2^15, 2^11 or 2^7."""
    if J == 2 or J == 5:
        return 32768.0
    elif J == 0 or J == 3 or J == 6:
        return 2048.0
    else:
        return 128.0


@triton.jit(do_not_specialize=["K"])
def _gemv_kernel(
    X, QW, S, Z, OUT, N, K,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    gi = tl.arange(0, GROUPS)[:, None]
    r = tl.arange(0, 16)[None, :]
    n_groups = tl.cdiv(K, 128)
    per_split = tl.cdiv(tl.cdiv(n_groups, SPLIT_K), GROUPS) * GROUPS
    g_lo = pid_k * per_split
    g_hi = tl.minimum(g_lo + per_split, n_groups)
    acc = tl.zeros((GROUPS, 16, BLOCK_N), tl.float32)
    for g0 in tl.range(g_lo, g_hi, GROUPS, num_stages=STAGES):
        g = g0 + gi  # [GROUPS, 1]: 2-D index tensors keep the loads free of broadcast copies
        if EVEN:  # noqa: SIM108 (whole groups, every split a whole number of GROUPS)
            g_ok = gi >= 0
        else:
            g_ok = g < g_hi
        gn_ok = g_ok & n_ok[None, :]
        row = (g * 16 + r)[:, :, None]
        w = tl.load(QW + row * N + n[None, None, :], mask=gn_ok[:, None, :], other=0)
        s = tl.load(S + g * N + n[None, :], mask=gn_ok, other=0.0).to(tl.float32)
        z = tl.load(Z + g * N + n[None, :], mask=gn_ok, other=0.0).to(tl.float32)
        t = tl.zeros((GROUPS, 16, BLOCK_N), tl.float32)
        sx = tl.zeros((GROUPS, 16), tl.float32)
        mx = tl.zeros((GROUPS, 16), tl.float32)  # sum of MAGIC * x
        for j in tl.static_range(8):
            k = g * 128 + 16 * j + r
            if EVEN:
                xj = tl.load(X + k).to(tl.float32)
            else:
                xj = tl.load(X + k, mask=g_ok & (k < K), other=0.0).to(tl.float32)
            sx += xj
            mx += xj * _magic(j)
            t += _gemv_plane(w, j, ASM) * xj[:, :, None]
        # t = sum (MAGIC + q) x: take out the magics and the zero point, leaving sum (q - z) x
        acc += s[:, None, :] * (t - mx[:, :, None] - z[:, None, :] * sx[:, :, None])
    out = tl.sum(tl.sum(acc, axis=1), axis=0)
    if SPLIT_K == 1:
        tl.store(OUT + n, out.to(OUT.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(OUT + n, out, mask=n_ok, sem="relaxed")


@triton.jit(do_not_specialize=["M", "K"])
def _mm_kernel(
    X, QW, S, Z, OUT, M, N, K, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    r = tl.arange(0, 16)
    n_groups = tl.cdiv(K, 128)
    per_split = tl.cdiv(n_groups, SPLIT_K)
    g_lo = pid_k * per_split
    g_hi = tl.minimum(g_lo + per_split, n_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(g_lo, g_hi):
        w = tl.load(QW + (g * 16 + r)[:, None] * N + n[None, :], mask=n_ok[None, :], other=0)
        s = tl.load(S + g * N + n, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(Z + g * N + n, mask=n_ok, other=0.0).to(tl.float32)
        if ASM:  # 128 + z as a bf16 pair
            zb = (z + 128.0).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            zz = (zb | (zb << 16))[None, :]
        part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for j in tl.static_range(4):  # nibbles j and j + 4 of each word
            k = g * 128 + 16 * j + r
            xptr = X + m[:, None] * stride_xm + k[None, :]
            if EVEN:  # K a multiple of 128
                xa = tl.load(xptr, mask=m_ok[:, None], other=0.0)
                xb = tl.load(xptr + 64, mask=m_ok[:, None], other=0.0)
            else:
                xa = tl.load(xptr, mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                xb = tl.load(xptr + 64, mask=m_ok[:, None] & (k + 64 < K)[None, :], other=0.0)
            src = w >> (4 * j)
            if ASM:
                qa, qb = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; "
                    "sub.bf16x2 t, t, $3; mov.b32 {$0, $1}, t; }",
                    "=h,=h,r,r",
                    [src, zz],
                    (tl.bfloat16, tl.bfloat16),
                    True,
                    1,
                )
            else:
                qa = ((src & 0xF).to(tl.float32) - z[None, :]).to(xa.dtype)
                qb = (((src >> 16) & 0xF).to(tl.float32) - z[None, :]).to(xa.dtype)
            part = tl.dot(xa, qa, part)
            part = tl.dot(xb, qb, part)
        acc += s[None, :] * part
    optr = OUT + m[:, None] * stride_om + n[None, :]
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(optr, acc.to(OUT.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(optr, acc, mask=omask, sem="relaxed")


@triton.jit
def _dequant_kernel(QW, S, Z, OUT, N, BLOCK_N: tl.constexpr):
    g = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    r = tl.arange(0, 16)
    w = tl.load(QW + (g * 16 + r)[:, None] * N + n[None, :], mask=n_ok[None, :], other=0)
    s = tl.load(S + g * N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    z = tl.load(Z + g * N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(8):
        q = ((w >> (4 * j)) & 0xF).to(tl.float32)
        optr = OUT + (g * 128 + 16 * j + r)[:, None] * N + n[None, :]
        tl.store(optr, ((q - z) * s).to(OUT.dtype.element_ty), mask=n_ok[None, :])


def _out(m: int, n: int, split_k: int, like: torch.Tensor) -> torch.Tensor:
    if split_k == 1:
        return torch.empty(m, n, dtype=like.dtype, device=like.device)
    return torch.zeros(m, n, dtype=torch.float32, device=like.device)


def gemv(
    x, qweight, scales, zeros, k, BLOCK_N, GROUPS, SPLIT_K, STAGES, num_warps, ASM
) -> torch.Tensor:  # noqa: ANN001, N803, E501
    """x [1, K] bf16 -> [1, N] in x's dtype."""
    n = qweight.shape[1]
    out = _out(1, n, SPLIT_K, x)
    grid = (triton.cdiv(n, BLOCK_N), SPLIT_K)
    _gemv_kernel[grid](
        x, qweight, scales, zeros, out, n, k,
        BLOCK_N=BLOCK_N, GROUPS=GROUPS, SPLIT_K=SPLIT_K,
        EVEN=k % 128 == 0 and -(-k // 128) % (GROUPS * SPLIT_K) == 0, STAGES=STAGES,
        ASM=ASM and not INTERPRET, num_warps=num_warps,
    )  # fmt: skip
    return out.to(x.dtype)


def mm(
    x, qweight, scales, zeros, k, BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages, ASM
) -> torch.Tensor:  # noqa: ANN001, N803, E501
    """x [M, K] bf16 -> [M, N] in x's dtype, M a few rows (tl.dot wants BLOCK_M >= 16)."""
    m, n = x.shape[0], qweight.shape[1]
    out = _out(m, n, SPLIT_K, x)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N), SPLIT_K)
    _mm_kernel[grid](
        x, qweight, scales, zeros, out, m, n, k, x.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT_K=SPLIT_K, EVEN=k % 128 == 0,
        ASM=ASM and not INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out.to(x.dtype)


def dequantize(qweight, scales, zeros, k, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """The transposed weight [K, N] in dtype, for a cuBLAS matmul."""
    rows, n = qweight.shape
    out = torch.empty(rows * 8, n, dtype=dtype, device=qweight.device)
    _dequant_kernel[(rows // 16, triton.cdiv(n, 128))](qweight, scales, zeros, out, n, BLOCK_N=128)
    return out[:k]


def linear(x, qweight, scales, zeros, k) -> torch.Tensor:  # noqa: ANN001
    """y = x W^T for x [M, K] bf16 and an int4 W, by the kernel that suits M."""
    x = x.contiguous()
    m = x.shape[0]
    if m == 1 and k <= GEMV_MAX_K:
        return gemv(x, qweight, scales, zeros, k, **GEMV)
    if m > DEQUANT_ABOVE:
        return x @ dequantize(qweight, scales, zeros, k, x.dtype)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return mm(x, qweight, scales, zeros, k, BLOCK_M=bm, **MM[bm])

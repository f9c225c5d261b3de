"""Paged decode attention: split-KV (flash-decoding) over the block table, GQA heads together.

One program takes one sequence, one KV head and one slice of the context: it reads each cached
key and value once for all the query heads of that KV head, dequantizes in registers and keeps
an online softmax. A second kernel merges the slices by their log-sum-exp. At long context a
decode step is bound by HBM bandwidth, so the bytes a format stores per token set its time.

The number of slices depends only on the batch size and a length bound, and each slice's length
is derived in the kernel from the sequence's own length: one launch shape serves every length,
which is what a CUDA graph needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.ops.triton.common import load_tile
from longserve.ops.triton.kv import PagedKV, decode_config


@triton.jit
def _int4_scores(qe, qo, x, XS, XZ, prow, nmask, colg, NG: tl.constexpr):
    """q . k over an int4 tile, the dots taken on the raw nibbles (1024 + nibble, exact in fp16).

    Per group: scale * (q_g . nibbles - (zero + 1024) * sum(q_g)); the scales then touch only
    the [rows, BN] score tile, not the [BN, D] key tile.
    """
    lo, hi = _nibbles(x)
    s = tl.zeros([qe.shape[0], x.shape[0]], tl.float32)
    for g in tl.static_range(NG):
        sc = tl.load(XS + prow + g, mask=nmask, other=0.0).to(tl.float32)
        zr = tl.load(XZ + prow + g, mask=nmask, other=0.0).to(tl.float32) + 1024.0
        qe_g = tl.where((colg == g)[None, :], qe, 0.0)
        qo_g = tl.where((colg == g)[None, :], qo, 0.0)
        raw = tl.dot(qe_g, tl.trans(lo)) + tl.dot(qo_g, tl.trans(hi))
        qsum = tl.sum(qe_g.to(tl.float32) + qo_g.to(tl.float32), 1)
        s += sc[None, :] * (raw - zr[None, :] * qsum[:, None])
    return s


@triton.jit
def _int4_values(acc, acc_o, p, x, XS, XZ, prow, nmask, colg, NG: tl.constexpr):
    """acc (even channels) and acc_o (odd) += p @ v over an int4 tile, on the raw nibbles.

    Per group: (p * scale) @ nibbles - sum(p * scale * (zero + 1024)), with p * scale rounded to
    fp16 once so that the 1024 offsets cancel exactly.
    """
    lo, hi = _nibbles(x)
    for g in tl.static_range(NG):
        sc = tl.load(XS + prow + g, mask=nmask, other=0.0).to(tl.float32)
        zr = tl.load(XZ + prow + g, mask=nmask, other=0.0).to(tl.float32) + 1024.0
        pg = (p * sc[None, :]).to(tl.float16)
        c = tl.sum(pg.to(tl.float32) * zr[None, :], 1)[:, None]
        in_g = (colg == g)[None, :]
        acc += tl.where(in_g, tl.dot(pg, lo) - c, 0.0)
        acc_o += tl.where(in_g, tl.dot(pg, hi) - c, 0.0)
    return acc, acc_o


@triton.jit
def _nibbles(x):
    """uint8 tile -> fp16 tiles of 1024 + its low and its high nibbles (by bit pattern)."""
    w = x.to(tl.uint16)
    lo = ((w & 15) | 0x6400).to(tl.float16, bitcast=True)
    hi = ((w >> 4) | 0x6400).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _decode_kernel(
    Q, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, s_sh,
    BT, SEQ, OP, LP, sm_scale, num_splits,
    s_qt, s_qh, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
    FMT: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BS: tl.constexpr, BN: tl.constexpr, QGS: tl.constexpr,
):  # fmt: skip
    # FMT (kv.py): 0 bf16/fp16, 1 fp8, 2 int4. Quantized formats compute in fp16: fp8 and
    # nibbles convert to it exactly and cheaply.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BN) * BN
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GP)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    qk_scale = sm_scale * 1.4426950408889634
    v_scale = 1.0
    if FMT == 1:
        qk_scale *= tl.load(KS + kvh * s_sh)
        v_scale = tl.load(VS + kvh * s_sh)
    q_row = Q + b * s_qt + heads[:, None] * s_qh
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    if FMT == 2:
        j = tl.arange(0, D // 2)
        colg = j // (QGS // 2)
        qe = tl.load(q_row + 2 * j[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
        qo = tl.load(q_row + 2 * j[None, :] + 1, mask=gmask[:, None], other=0.0).to(tl.float16)
        acc = tl.zeros([GP, D // 2], tl.float32)
        acc_o = tl.zeros([GP, D // 2], tl.float32)
    else:
        d = tl.arange(0, D)
        q = tl.load(q_row + d[None, :], mask=gmask[:, None], other=0.0)
        if FMT == 1:
            q = q.to(tl.float16)
        acc = tl.zeros([GP, D], tl.float32)

    for n0 in tl.range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        nmask = n < end
        blk = tl.load(BT + b * s_bt + n // BS, mask=nmask, other=0).to(tl.int64)
        row = blk * s_kb + (n % BS) * s_ks + kvh * s_kh
        if FMT == 2:
            prow = blk * s_pb + (n % BS) * s_ps + kvh * s_ph
            x = tl.load(K + row[:, None] + j[None, :], mask=nmask[:, None], other=0)
            s = _int4_scores(qe, qo, x, KS, KZ, prow, nmask, colg, D // QGS)
        else:
            s = tl.dot(q, tl.trans(load_tile(K, row, nmask, d, q.dtype)))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if FMT == 2:
            x = tl.load(V + row[:, None] + j[None, :], mask=nmask[:, None], other=0)
            acc, acc_o = _int4_values(
                acc * alpha[:, None], acc_o * alpha[:, None], p, x, VS, VZ, prow, nmask, colg,
                D // QGS,
            )  # fmt: skip
        else:
            v = load_tile(V, row, nmask, d, q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)

    inv = tl.where(l_i > 0, v_scale / l_i, 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(LP + b * s_lb + heads * s_lh + split, lse, mask=gmask)
    o_row = OP + b * s_ob + heads[:, None] * s_oh + split * s_os
    if FMT == 2:
        tl.store(o_row + 2 * j[None, :], acc * inv[:, None], mask=gmask[:, None])
        tl.store(o_row + 2 * j[None, :] + 1, acc_o * inv[:, None], mask=gmask[:, None])
    else:
        tl.store(o_row + d[None, :], acc * inv[:, None], mask=gmask[:, None])


@triton.jit
def _merge_kernel(
    OP, LP, OUT, num_splits, s_ob, s_oh, s_os, s_lb, s_lh, s_ot, s_o_h,
    D: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SP)
    smask = sp < num_splits
    d = tl.arange(0, D)
    lse = tl.load(LP + b * s_lb + h * s_lh + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    o = tl.load(
        OP + b * s_ob + h * s_oh + sp[:, None] * s_os + d[None, :], mask=smask[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(OUT + b * s_ot + h * s_o_h + d, out.to(OUT.dtype.element_ty))


def num_splits(
    batch: int, kv_heads: int, max_seq_len: int, device: torch.device, waves: int = 4
) -> int:
    """Enough programs for `waves` programs per SM, each slice at least 256 tokens long."""
    sms = 8
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(waves * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_seq_len, 256)))


def paged_decode(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """q [B, Hq, D], one query per sequence at its last position -> out [B, Hq, D].

    block_table [B, max_blocks] int32 and seq_lens [B] int32 (tokens in the cache, this step's
    included); max_seq_len bounds seq_lens and fixes the number of slices. splits and block_n
    default to decode_config's choice.
    """
    batch, hq, dim = q.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    bn, waves = decode_config(kv.fmt, batch, hkv)
    block_n = block_n or bn
    splits = splits or num_splits(batch, hkv, max_seq_len, q.device, waves)
    op = torch.empty(batch, hq, splits, dim, dtype=torch.float32, device=q.device)
    lp = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, hkv, splits)](
        q, *kv.kernel_args(), block_table, seq_lens, op, lp, sm_scale, splits,
        q.stride(0), q.stride(1), block_table.stride(0), *op.stride()[:3], *lp.stride()[:2],
        FMT=kv.fmt, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=dim,
        BS=kv.block_size, BN=block_n, QGS=kv.group_size, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(batch, hq)](
        op, lp, out, splits, *op.stride()[:3], *lp.stride()[:2], out.stride(0), out.stride(1),
        D=dim, SP=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out

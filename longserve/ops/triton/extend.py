"""Prefill / extend attention: a chunk of queries over its sequence's paged cache, causally.

The chunk's own keys and values are already in the cache (the store kernel runs first), so one
loop covers the cached prefix (a prefix-cache hit or earlier chunks) and the chunk itself: query
i of a chunk of n sits at position seq_len - n + i and sees keys 0..that position.

A program takes a tile of rows that packs TM consecutive tokens times the GROUP query heads of
one KV head, so each K/V tile read serves the whole group; a decode row (a chunk of one) in a
mixed batch then still fills GROUP rows. Key tiles wholly below the tile's first position need
no mask and run a separate, cheaper loop; tiles run longest first to even out the causal work.

On Hopper, sequences of 128 queries or more take warp_prefill.py's kernel instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.ops.triton.common import int4_channels, load_int4_tile, load_tile
from longserve.ops.triton.kv import PagedKV, extend_config


@triton.jit
def _program(CUQ):
    """This program's query tile (the grid's last first: longest causal work first), sequence,
    head, and where that sequence's queries lie in the batch: [q0, q0 + n_q)."""
    b = tl.program_id(1)
    q0 = tl.load(CUQ + b)
    return (
        tl.num_programs(0) - 1 - tl.program_id(0),
        b,
        tl.program_id(2),
        q0,
        tl.load(CUQ + b + 1) - q0,
    )


@triton.jit
def _attend(
    acc, acc_o, m_i, l_i, q, qo, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph,
    BT, b_row, kvh, start, end, pos, qk_scale,
    MASK: tl.constexpr, FMT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    QGS: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [start, end).

    For int4, q/acc hold the low nibbles' channels and qo/acc_o the high ones' (common.py). The
    page ids load a tile ahead: the K/V loads then wait on no load of their own iteration, and
    the pipeliner gives them every stage (on the H200, 1.13-1.14x at 16K and 128K).
    """
    nn = start + tl.arange(0, BN)
    blk_next = tl.load(BT + b_row + nn // BS, mask=nn < end, other=0).to(tl.int64)
    for n0 in tl.range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        nmask = n < end
        blk = blk_next
        nn = n + BN
        blk_next = tl.load(BT + b_row + nn // BS, mask=nn < end, other=0).to(tl.int64)
        row = blk * s_kb + (n % BS) * s_ks + kvh * s_kh
        if FMT == 2:
            j = tl.arange(0, D // 2)
            prow = blk * s_pb + (n % BS) * s_ps + kvh * s_ph
            k_lo, k_hi = load_int4_tile(K, KS, KZ, row, prow, nmask, j, q.dtype, D, QGS)
            s = tl.dot(q, tl.trans(k_lo)) + tl.dot(qo, tl.trans(k_hi))
        else:
            d = tl.arange(0, D)
            s = tl.dot(q, tl.trans(load_tile(K, row, nmask, d, q.dtype)))
        s = s * qk_scale
        if MASK:
            s = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p = p.to(q.dtype)
        if FMT == 2:
            v_lo, v_hi = load_int4_tile(V, VS, VZ, row, prow, nmask, j, q.dtype, D, QGS)
            acc = acc * alpha[:, None] + tl.dot(p, v_lo)
            acc_o = acc_o * alpha[:, None] + tl.dot(p, v_hi)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, load_tile(V, row, nmask, d, q.dtype))
    return acc, acc_o, m_i, l_i


@triton.jit
def _extend_kernel(
    Q, OUT, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, s_sh,
    BT, SEQ, CUQ, sm_scale, s_qt, s_qh, s_ot, s_oh, s_bt, fewer_than,
    FMT: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, TM: tl.constexpr, BN: tl.constexpr, QGS: tl.constexpr,
):  # fmt: skip
    # FMT (kv.py): 0 bf16/fp16, 1 fp8, 2 int4; quantized formats compute in fp16 (cheap, exact
    # conversions from fp8 and from the dequantized int4 values' range)
    tile, b, kvh, q0, n_q = _program(CUQ)
    if tile * TM < n_q and n_q < fewer_than:
        seq_len = tl.load(SEQ + b)
        first = seq_len - n_q + tile * TM  # position of the tile's first query
        r = tl.arange(0, BM)
        tok = tile * TM + r // GROUP
        rmask = (r < TM * GROUP) & (tok < n_q)
        pos = seq_len - n_q + tok
        qk_scale = sm_scale * 1.4426950408889634
        v_scale = 1.0
        if FMT == 1:
            qk_scale *= tl.load(KS + kvh * s_sh)
            v_scale = tl.load(VS + kvh * s_sh)
        q_row = (
            Q + (q0 + tok)[:, None].to(tl.int64) * s_qt + (kvh * GROUP + r % GROUP)[:, None] * s_qh
        )
        o_row = (
            OUT
            + (q0 + tok)[:, None].to(tl.int64) * s_ot
            + (kvh * GROUP + r % GROUP)[:, None] * s_oh
        )
        if FMT == 2:
            ch_lo, ch_hi = int4_channels(tl.arange(0, D // 2), D)
            q = tl.load(q_row + ch_lo[None, :], mask=rmask[:, None], other=0.0).to(tl.float16)
            qo = tl.load(q_row + ch_hi[None, :], mask=rmask[:, None], other=0.0).to(tl.float16)
            acc = tl.zeros([BM, D // 2], tl.float32)
            acc_o = tl.zeros([BM, D // 2], tl.float32)
        else:
            d = tl.arange(0, D)
            q = tl.load(q_row + d[None, :], mask=rmask[:, None], other=0.0)
            if FMT == 1:
                q = q.to(tl.float16)
            qo = q
            acc = tl.zeros([BM, D], tl.float32)
            acc_o = acc
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        b_row = b * s_bt
        full_end = (first + 1) // BN * BN  # keys below it are visible to every row of the tile
        last = tl.minimum(first + TM, seq_len)
        acc, acc_o, m_i, l_i = _attend(
            acc, acc_o, m_i, l_i, q, qo, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph,
            BT, b_row, kvh, 0, full_end, pos, qk_scale, False, FMT, D, BS, BN, QGS,
        )  # fmt: skip
        acc, acc_o, m_i, l_i = _attend(
            acc, acc_o, m_i, l_i, q, qo, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph,
            BT, b_row, kvh, full_end, last, pos, qk_scale, True, FMT, D, BS, BN, QGS,
        )  # fmt: skip
        inv = v_scale / l_i
        if FMT == 2:
            tl.store(
                o_row + ch_lo[None, :],
                (acc * inv[:, None]).to(OUT.dtype.element_ty),
                mask=rmask[:, None],
            )
            tl.store(
                o_row + ch_hi[None, :],
                (acc_o * inv[:, None]).to(OUT.dtype.element_ty),
                mask=rmask[:, None],
            )
        else:
            tl.store(
                o_row + d[None, :],
                (acc * inv[:, None]).to(OUT.dtype.element_ty),
                mask=rmask[:, None],
            )


def paged_extend(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    sm_scale: float,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    fewer_than: int = 2**31 - 1,
) -> torch.Tensor:
    """q [T, Hq, D] (each sequence's queries are the last ones of its context) -> out [T, Hq, D].

    cu_seqlens_q [B + 1] int32 offsets of each sequence's queries in q; seq_lens [B] int32. Only
    sequences with fewer than fewer_than queries are computed (into out, if given): the others'
    rows are a TMA kernel's.
    """
    _, hq, dim = q.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    cfg = dict(config or extend_config(dim, group))
    tm = cfg.pop("TM")
    if tm * group > cfg["BM"]:
        raise ValueError(f"TM {tm} x group {group} rows do not fit a tile of {cfg['BM']}")
    out = torch.empty_like(q) if out is None else out
    grid = (triton.cdiv(max_query_len, tm), seq_lens.shape[0], hkv)
    _extend_kernel[grid](
        q, out, *kv.kernel_args(), block_table, seq_lens, cu_seqlens_q, sm_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0), fewer_than,
        FMT=kv.fmt, GROUP=group, D=dim, BS=kv.block_size, TM=tm, QGS=kv.group_size, **cfg,
    )  # fmt: skip
    return out

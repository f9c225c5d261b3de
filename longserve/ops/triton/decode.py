"""Paged decode attention: split-KV (flash-decoding) over the block table, GQA heads together.

One program takes one sequence, one KV head and one slice of the context: it reads each cached
key and value once for all the query heads of that KV head, dequantizes in registers and keeps
an online softmax. A second kernel merges the slices by their log-sum-exp. At long context a
decode step is bound by HBM bandwidth, so the bytes a format stores per token set its time.

The number of slices depends only on the batch size and a length bound, and each slice's length
is derived in the kernel from the sequence's own length: one launch shape serves every length,
which is what a CUDA graph needs.

Quantized V (fp8) and K/V (int4) are read as words of four channels (fp8: uint32, int4: uint16)
and split in registers into four phase tiles that feed the tensor cores in fp16: an 8-bit
[keys, channels] V tile as the B operand of p @ v cannot take the transposing ldmatrix path and
was read from shared memory byte by byte. An fp8 word holds channels 4c .. 4c+3; an int4 word
one channel of each quarter of the head (kv/quant.py), so that an int4 phase tile is a quarter:
one scale group per key, or whole groups. Int4 dots run on the bare nibbles as fp16 subnormals;
group scales and zeros touch only the small score and probability tiles. With ZD_GROUPS groups a
head or more, the zero-point terms are dots too (q's group sums against the keys' scale x zero;
the scaled probabilities against the values' zeros, into a small accumulator subtracted at the
end), which spares moving each group's zeros to the score and probability tiles.

On Hopper, most caches take warp_decode.py's kernel instead (Gluon: one warp a program, keys on
the tensor cores' M axis; kv.py's warp_decode_serves); its slices go through the same merge.
This kernel serves the rest, and the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from longserve.ops.triton import warp_decode
from longserve.ops.triton.common import INT4_PHASES_PTX, INTERPRET, hopper, load_tile
from longserve.ops.triton.kv import INT4, PagedKV, decode_config, warp_decode_config


@triton.jit
def _words(X, blk, n, nmask, kvh, s_kb, s_ks, s_kh, c, FMT: tl.constexpr, BS: tl.constexpr):
    """A [BN, D/4] tile of a quantized pool as words of four channels: uint32 for fp8 (bytes
    4c .. 4c+3), uint16 for int4 (nibbles of channels c, c + D/4, c + D/2, c + 3D/4)."""
    if FMT == 1:
        W = X.to(tl.pointer_type(tl.uint32))
        row = blk * (s_kb // 4) + (n % BS) * (s_ks // 4) + kvh * (s_kh // 4)
    else:
        W = X.to(tl.pointer_type(tl.uint16))
        row = blk * (s_kb // 2) + (n % BS) * (s_ks // 2) + kvh * (s_kh // 2)
    return tl.load(W + row[:, None] + c[None, :], mask=nmask[:, None], other=0)


@triton.jit
def _chan(c, t: tl.constexpr, FMT: tl.constexpr, D: tl.constexpr):
    """The channels of phase tile t: 4c + t for fp8, quarter t of the head for int4."""
    return c + t * (D // 4) if FMT == 2 else 4 * c + t


def _fp8_ptx(fmt: str) -> tl.constexpr:
    cvt = f"cvt.rn.f16x2.{fmt}x2"
    return tl.constexpr(
        "{ .reg .b32 t; .reg .b16 lo, hi;\n"
        f"prmt.b32 t, $4, $5, 0x5140; mov.b32 {{lo, hi}}, t; {cvt} $0, lo; {cvt} $1, hi;\n"
        f"prmt.b32 t, $4, $5, 0x7362; mov.b32 {{lo, hi}}, t; {cvt} $2, lo; {cvt} $3, hi; }}"
    )


_PTX_E4M3, _PTX_E5M2 = _fp8_ptx("e4m3"), _fp8_ptx("e5m2")


@triton.jit
def _fp8_pairs(w, PTX: tl.constexpr):
    return tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r,r", [w], (tl.float16,) * 4, True, 2)


@triton.jit
def _phases(w, FMT: tl.constexpr, F8: tl.constexpr, ASM: tl.constexpr):
    """The four phase tiles of a word tile, in fp16: tile t holds byte or nibble t of each word.

    fp8: the value. With ASM, inline PTX converts two words (neighbours along the dot's reduction
    axis) at a time: one prmt per two pairs and the hardware's fp8x2 -> f16x2 conversion.
    int4: the nibble's own bits read as an fp16 subnormal, nib * 2^-24 (nibbles 1 and 3 sit four
    bits up: 16 x that), exact, with no offset for the tensor cores' sums to cancel (1024 + nib
    lost 4% of a 128K-token output). With ASM two words share a register: four ANDs and one
    shift give four f16x2 pairs; Triton's own 16-bit ops would pack them one by one.
    Without ASM (Triton's interpreter runs no PTX) the same values come from plain integer ops.
    """
    if FMT == 2 and ASM:
        # two uint16 words in one register: four ANDs and a shift make four f16x2 pairs
        x0, x1, x2, x3 = tl.inline_asm_elementwise(
            INT4_PHASES_PTX, "=r,=r,=r,=r,r", [w], (tl.float16,) * 4, True, 2
        )
    elif FMT == 2:
        # each nibble's bits as an fp16 subnormal: nib * 2^-24, or nib * 2^-20 in bits 4-7
        x0 = (w & 0xF).to(tl.float16, bitcast=True)
        x1 = (w & 0xF0).to(tl.float16, bitcast=True)
        x2 = ((w >> 8) & 0xF).to(tl.float16, bitcast=True)
        x3 = ((w >> 8) & 0xF0).to(tl.float16, bitcast=True)
    elif ASM:
        # bytes t of the two words side by side, then fp8x2 -> f16x2
        x0, x1, x2, x3 = _fp8_pairs(w, _PTX_E5M2 if F8.is_fp8e5() else _PTX_E4M3)
    else:
        x0 = (w & 0xFF).to(tl.uint8).to(F8, bitcast=True).to(tl.float16)
        x1 = ((w >> 8) & 0xFF).to(tl.uint8).to(F8, bitcast=True).to(tl.float16)
        x2 = ((w >> 16) & 0xFF).to(tl.uint8).to(F8, bitcast=True).to(tl.float16)
        x3 = (w >> 24).to(tl.uint8).to(F8, bitcast=True).to(tl.float16)
    return x0, x1, x2, x3


_TINY: tl.constexpr = tl.constexpr(2.0**-24)  # an fp16 subnormal's unit: int4 phases count in it
# int4 heads of this many groups or more take their zero-point terms on the tensor cores: on the
# H200 at 128K, groups of 32 (4 a head) went from 0.85 to 0.70 x bf16's time, groups of 64 (2 a
# head) from 0.50 to 0.515 (docs/kernels.md)
ZD_GROUPS = 4


@triton.jit
def _col(x, gi, g: tl.constexpr):
    """Column g of a [rows, groups] tile."""
    return tl.sum(tl.where(gi[None, :] == g, x, 0.0), 1)


@triton.jit
def _repeat(x, width: tl.constexpr):
    """A [rows, groups] tile repeated along its columns to `width` (a multiple of groups)."""
    rows: tl.constexpr = x.shape[0]
    groups: tl.constexpr = x.shape[1]
    return tl.reshape(
        tl.broadcast_to(x[:, None, :], [rows, width // groups, groups]), [rows, width]
    )


@triton.jit
def _int4_scores(
    qs, ks, k_sc, k_zr, q_sums, gi, c, D: tl.constexpr, QGS: tl.constexpr, GP, BN,
    ZD: tl.constexpr,
):  # fmt: skip
    """Scores from int4 quarters, group by group: q . k = scale * (q . nib - zero * sum(q)), the
    dots in units of 2^-24 (_phases; odd quarters of q come divided by 16), the group's scale
    and zero one FMA each on the score tile. A group spans whole quarters or lies in one (its
    dot then masked to its channels). With ZD the zero terms are left to the caller's dot."""
    QPG: tl.constexpr = (QGS + D // 4 - 1) // (D // 4)  # quarters a group spans
    SUB: tl.constexpr = (D // 4 + QGS - 1) // QGS  # groups in a quarter
    s = tl.zeros([GP, BN], tl.float32)
    for gr in tl.static_range(D // QGS):
        raw = tl.zeros([GP, BN], tl.float32)
        for i in tl.static_range(QPG):
            q_u = qs[gr // SUB * QPG + i]
            if SUB > 1:
                q_u = tl.where((c // QGS == gr % SUB)[None, :], q_u, 0.0)
            raw = tl.dot(q_u, ks[gr // SUB * QPG + i], raw)
        if not ZD:
            raw -= _col(k_zr, gi, gr)[None, :] * _col(q_sums, gi, gr)[:, None]
        s += _col(k_sc, gi, gr)[None, :] * raw
    return s


@triton.jit
def _pv(a, pw, v, off, c, j, QGS: tl.constexpr, SUB: tl.constexpr):
    """a + pw @ v - off, over the channels of group j of the quarter when it holds several."""
    if SUB > 1:
        a += tl.where((c // QGS == j)[None, :], tl.dot(pw, v) - off, 0.0)
    else:
        a = tl.dot(pw, v, a) - off
    return a


@triton.jit
def _int4_values(
    accs, offs, p, vs, v_sc, v_zr, gi, zj, c, D: tl.constexpr, QGS: tl.constexpr, ZD: tl.constexpr
):  # fmt: skip
    """accs + p @ v over int4 quarters, group by group: (p * scale) @ nib - sum(p * scale *
    zero), in units of 2^-24 (odd quarters 16 times that), with p * scale rounded to fp16 once
    so that both terms take the same weights. With ZD the zero sums go, as one dot per group
    against the keys' zeros, to column g of offs, subtracted once at the end (_int4_offsets)."""
    QPG: tl.constexpr = (QGS + D // 4 - 1) // (D // 4)
    SUB: tl.constexpr = (D // 4 + QGS - 1) // QGS
    a0, a1, a2, a3 = accs
    for gr in tl.static_range(D // QGS):
        pw = (p * _col(v_sc, gi, gr)[None, :]).to(tl.float16)
        if ZD:
            offs += tl.where(zj[None, :] == gr, tl.dot(pw, v_zr), 0.0)
            off = 0.0
        else:
            off = tl.sum(pw.to(tl.float32) * _col(v_zr, gi, gr)[None, :], 1)[:, None]
        for i in tl.static_range(QPG):
            if gr // SUB * QPG + i == 0:
                a0 = _pv(a0, pw, vs[0], off, c, gr % SUB, QGS, SUB)
            if gr // SUB * QPG + i == 1:
                a1 = _pv(a1, pw, vs[1], off * 16.0, c, gr % SUB, QGS, SUB)
            if gr // SUB * QPG + i == 2:
                a2 = _pv(a2, pw, vs[2], off, c, gr % SUB, QGS, SUB)
            if gr // SUB * QPG + i == 3:
                a3 = _pv(a3, pw, vs[3], off * 16.0, c, gr % SUB, QGS, SUB)
    return a0, a1, a2, a3, offs


@triton.jit
def _int4_offsets(offs, zj, c, t: tl.constexpr, D: tl.constexpr, QGS: tl.constexpr, GP):
    """[GP, D/4]: each channel of quarter t takes its group's column of offs, in 2^-24 units."""
    grp = (t * (D // 4) + c) // QGS
    o = tl.zeros([GP, D // 4], tl.float32)
    for gr in tl.static_range(D // QGS):
        o = tl.where((grp == gr)[None, :], _col(offs, zj, gr)[:, None], o)
    return o * (_TINY * (16.0 if t % 2 else 1.0))


@triton.jit
def _decode_kernel(
    Q, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, s_sh,
    BT, SEQ, OP, LP, sm_scale, num_splits,
    s_qt, s_qh, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
    FMT: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BS: tl.constexpr, BN: tl.constexpr, QGS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
    ZD: tl.constexpr, ZP: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    # FMT (kv.py): 0 bf16/fp16, 1 fp8, 2 int4. Quantized formats compute in fp16, to which fp8
    # and nibbles convert exactly, on phase tiles (module docstring).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ + b)
    # whole tiles dealt out evenly: no slice holds more than one tile over another (slices
    # rounded up to whole tiles left the last few empty: at 128K x 1, 512 of 528 programs busy)
    tiles = tl.cdiv(seq_len, BN)
    start = split * tiles // num_splits * BN
    end = tl.minimum((split + 1) * tiles // num_splits * BN, seq_len)

    g = tl.arange(0, GP)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    qk_scale = sm_scale * 1.4426950408889634
    v_scale = 1.0
    F8 = K.dtype.element_ty
    if FMT == 1:
        qk_scale *= tl.load(KS + kvh * s_sh)
        v_scale = tl.load(VS + kvh * s_sh)
    q_row = Q + b * s_qt + heads[:, None] * s_qh
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    d = tl.arange(0, D)
    c = tl.arange(0, D // 4)
    q = tl.load(q_row + d[None, :], mask=gmask[:, None], other=0.0)
    acc = tl.zeros([GP, D], tl.float32)
    a0 = tl.zeros([GP, D // 4], tl.float32)
    a1 = tl.zeros([GP, D // 4], tl.float32)
    a2 = tl.zeros([GP, D // 4], tl.float32)
    a3 = tl.zeros([GP, D // 4], tl.float32)
    if FMT != 0:
        q = q.to(tl.float16)
    if FMT == 2:
        # int4 quarters of q; phases 1 and 3 count nibbles in 16 x 2^-24 (_phases), so their q
        # takes 1/16
        q0 = tl.load(q_row + _chan(c, 0, FMT, D)[None, :], mask=gmask[:, None], other=0.0)
        q1 = tl.load(q_row + _chan(c, 1, FMT, D)[None, :], mask=gmask[:, None], other=0.0)
        q2 = tl.load(q_row + _chan(c, 2, FMT, D)[None, :], mask=gmask[:, None], other=0.0)
        q3 = tl.load(q_row + _chan(c, 3, FMT, D)[None, :], mask=gmask[:, None], other=0.0)
        qs = (
            q0.to(tl.float16),
            (q1 * 0.0625).to(tl.float16),
            q2.to(tl.float16),
            (q3 * 0.0625).to(tl.float16),
        )
        q_sums = tl.sum(tl.reshape(q.to(tl.float32), [GP, D // QGS, QGS]), 2)
        gi = tl.arange(0, D // QGS)
        v_scale = 1.0 / _TINY
        # ZD: the zero terms as dots over ZP (>= 16) columns, the groups' columns repeated
        zj = tl.arange(0, ZP)
        offs = tl.zeros([GP, ZP], tl.float32)
        if ZD:
            nqs = tl.zeros([GP, ZP], tl.float32)
            for gr in tl.static_range(D // QGS):
                nqs = tl.where(zj[None, :] % (D // QGS) == gr, -_col(q_sums, gi, gr)[:, None], nqs)
            nqs = (nqs * ((D // QGS) / ZP)).to(tl.float16)

    # Every tile but a slice's last is whole: with SPLIT their loop runs with the key mask a
    # constant, which the compiler folds away (on the H200, fp8 -3.5% and int4 -8% of the time),
    # and a second loop runs the masked body over the last tile if it is partial; int4 with one
    # group a head ran 15% faster as the one masked loop (docs/kernels.md).
    full_end = start + (end - start) // BN * BN if SPLIT else start
    for part in tl.static_range(0 if SPLIT else 1, 2):
        for n0 in tl.range(
            start if part == 0 else full_end,
            full_end if part == 0 else end,
            BN,
        ):
            n = n0 + tl.arange(0, BN)
            nmask = tl.full([BN], 1, tl.int1) if part == 0 else n < end
            blk = tl.load(BT + b * s_bt + n // BS, mask=nmask, other=0).to(tl.int64)
            if FMT != 2:
                row = blk * s_kb + (n % BS) * s_ks + kvh * s_kh
                s = tl.dot(q, tl.trans(load_tile(K, row, nmask, d, q.dtype))) * qk_scale
            else:
                # int4 dots run on the nibbles; a group's scale and zero then touch only the small
                # score and probability tiles
                prow = tl.multiple_of(blk * s_pb + (n % BS) * s_ps + kvh * s_ph, D // QGS)
                pg = prow[:, None] + gi[None, :]  # see PagedKV: rows of whole groups
                ks = _phases(
                    tl.trans(_words(K, blk, n, nmask, kvh, s_kb, s_ks, s_kh, c, FMT, BS)), FMT, F8,
                    ASM,
                )  # fmt: skip
                k_sc = tl.load(KS + pg, mask=nmask[:, None], other=0.0).to(tl.float32)
                k_zr = tl.load(KZ + pg, mask=nmask[:, None], other=0.0).to(tl.float32)
                # the value parameters load here, long before their use: Triton's pipeliner leaves
                # the zeros (no dot operand hangs on them) to a plain load
                v_sc = tl.load(VS + pg, mask=nmask[:, None], other=0.0).to(tl.float32)
                v_zr = tl.load(VZ + pg, mask=nmask[:, None], other=0.0)
                s = _int4_scores(
                    qs, ks, k_sc * (qk_scale / _TINY), k_zr * _TINY, q_sums, gi, c, D, QGS, GP, BN,
                    ZD,
                )  # fmt: skip
                if ZD:
                    s = tl.dot(nqs, tl.trans(_repeat(k_sc * k_zr * qk_scale, ZP).to(tl.float16)), s)
                    v_zr = _repeat(v_zr, ZP)
                else:
                    v_zr = v_zr.to(tl.float32) * _TINY
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if FMT == 0:
                v = load_tile(V, row, nmask, d, q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
            else:
                v0, v1, v2, v3 = _phases(
                    _words(V, blk, n, nmask, kvh, s_kb, s_ks, s_kh, c, FMT, BS), FMT, F8, ASM
                )
                a0 = a0 * alpha[:, None]
                a1 = a1 * alpha[:, None]
                a2 = a2 * alpha[:, None]
                a3 = a3 * alpha[:, None]
                if FMT == 1:
                    p16 = p.to(tl.float16)
                    a0 = tl.dot(p16, v0, a0)
                    a1 = tl.dot(p16, v1, a1)
                    a2 = tl.dot(p16, v2, a2)
                    a3 = tl.dot(p16, v3, a3)
                else:
                    if ZD:
                        offs = offs * alpha[:, None]
                    a0, a1, a2, a3, offs = _int4_values(
                        (a0, a1, a2, a3), offs, p, (v0, v1, v2, v3), v_sc, v_zr,
                        gi, zj, c, D, QGS, ZD,
                    )  # fmt: skip

    if PDL:
        # the merge kernel may launch now: it waits in gdc_wait for this grid's stores, and its
        # launch overlaps the last slices' epilogues
        gdc_launch_dependents()
    if FMT == 2 and ZD:
        a0 -= _int4_offsets(offs, zj, c, 0, D, QGS, GP)
        a1 -= _int4_offsets(offs, zj, c, 1, D, QGS, GP)
        a2 -= _int4_offsets(offs, zj, c, 2, D, QGS, GP)
        a3 -= _int4_offsets(offs, zj, c, 3, D, QGS, GP)
    inv = tl.where(l_i > 0, v_scale / l_i, 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(LP + b * s_lb + heads * s_lh + split, lse, mask=gmask)
    o_row = OP + b * s_ob + heads[:, None] * s_oh + split * s_os
    if FMT == 0:
        tl.store(o_row + d[None, :], acc * inv[:, None], mask=gmask[:, None])
    else:
        odd = inv * (0.0625 if FMT == 2 else 1.0)  # int4's odd quarters: 16 x the unit
        tl.store(o_row + _chan(c, 0, FMT, D)[None, :], a0 * inv[:, None], mask=gmask[:, None])
        tl.store(o_row + _chan(c, 1, FMT, D)[None, :], a1 * odd[:, None], mask=gmask[:, None])
        tl.store(o_row + _chan(c, 2, FMT, D)[None, :], a2 * inv[:, None], mask=gmask[:, None])
        tl.store(o_row + _chan(c, 3, FMT, D)[None, :], a3 * odd[:, None], mask=gmask[:, None])


@triton.jit
def _merge_kernel(
    OP, LP, OUT, num_splits, s_ob, s_oh, s_os, s_lb, s_lh, s_ot, s_o_h,
    D: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out = the slices' outputs weighted by exp2(lse), SB slices at a time."""
    if PDL:
        gdc_wait()  # for the decode grid's partial outputs
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SP)
    lp = LP + b * s_lb + h * s_lh
    m = tl.max(tl.load(lp + sp, mask=sp < num_splits, other=float("-inf")), 0)
    m = tl.where(m > float("-inf"), m, 0.0)
    d = tl.arange(0, D)
    out = tl.zeros([D], tl.float32)
    total = 0.0
    for s0 in range(0, num_splits, SB):
        sb = s0 + tl.arange(0, SB)
        w = tl.exp2(tl.load(lp + sb, mask=sb < num_splits, other=float("-inf")) - m)
        o = tl.load(
            OP + b * s_ob + h * s_oh + sb[:, None] * s_os + d[None, :],
            mask=(sb < num_splits)[:, None],
            other=0.0,
        )
        out += tl.sum(w[:, None] * o, 0)
        total += tl.sum(w, 0)
    tl.store(
        OUT + b * s_ot + h * s_o_h + d, (out / tl.maximum(total, 1e-30)).to(OUT.dtype.element_ty)
    )


def num_splits(
    batch: int, kv_heads: int, max_seq_len: int, device: torch.device, waves: int = 4
) -> int:
    """Slices per (sequence, KV head): at most `waves` programs per SM, rounded down: a sliver
    past a whole wave leaves a mostly idle extra one (on the H200 at 128K x 8, 576 programs took
    1.43x the time of 2,112; docs/kernels.md), and down again to a power of two, which deals a
    power-of-two length's tiles out evenly (at 128K x 1 in bf16, 66 slices left four holding a
    tile more than the rest: 140.8 us against 139.2 for 64). Each slice holds at least 256
    tokens."""
    sms = 8
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = min(waves * sms // (batch * kv_heads), triton.cdiv(max_seq_len, 256))
    return 1 << max(0, want.bit_length() - 1)


def paged_decode(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    gluon: bool | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], one query per sequence at its last position -> out [B, Hq, D].

    block_table [B, max_blocks] int32 and seq_lens [B] int32 (tokens in the cache, this step's
    included); max_seq_len bounds seq_lens and fixes the number of slices. splits defaults to
    num_splits, block_n, num_warps and num_stages to decode_config (warp_decode_config where
    warp_decode.py's kernel serves; it always runs one warp). gluon=False keeps to this module's
    kernel where warp_decode.py's would serve (the benchmark's peer); None picks.
    """
    batch, hq, dim = q.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    # the merge launches as a programmatic dependent of the decode grid: on the H200 at 128K x 1
    # that took bf16 from 140.9 to 139.2 us (docs/kernels.md)
    pdl = q.is_cuda and hopper(q.device.index)
    warp = gluon is not False and pdl and warp_decode.serves(kv, dim, group)
    groups = dim // kv.group_size if kv.fmt == INT4 else 1
    launch = warp_decode_config(kv.fmt, groups) if warp else decode_config(kv.fmt)
    block_n = block_n or launch["block_n"]
    num_warps = num_warps or launch["num_warps"]
    num_stages = num_stages or launch["num_stages"]
    splits = splits or num_splits(batch, hkv, max_seq_len, q.device, launch["waves"])
    op = torch.empty(batch, hq, splits, dim, dtype=torch.float32, device=q.device)
    lp = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    if warp:
        warp_decode.warp_decode(q, kv, block_table, seq_lens, sm_scale, op, lp, block_n, num_stages)
    else:
        _decode_kernel[(batch, hkv, splits)](
            q, *kv.kernel_args(), block_table, seq_lens, op, lp, sm_scale, splits,
            q.stride(0), q.stride(1), block_table.stride(0), *op.stride()[:3], *lp.stride()[:2],
            FMT=kv.fmt, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=dim,
            BS=kv.block_size, BN=block_n, QGS=kv.group_size, ASM=not INTERPRET, PDL=pdl,
            ZD=groups >= ZD_GROUPS, ZP=max(16, triton.next_power_of_2(groups)),
            SPLIT=kv.fmt != INT4 or groups > 1, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(batch, hq)](
        op, lp, out, splits, *op.stride()[:3], *lp.stride()[:2], out.stride(0), out.stride(1),
        D=dim, SP=triton.next_power_of_2(splits), SB=min(64, triton.next_power_of_2(splits)),
        PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return out

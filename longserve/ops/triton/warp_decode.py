"""Paged decode on Hopper (Gluon) in every KV format: one warp a program, keys on the tensor
cores' M axis.

The Triton kernel (decode.py) computes scores as [query heads, keys], so its tiles pad the GQA
group to 16 rows; in int4 it holds each key's group scale and zero in eight lanes, moving them
there through shared memory every tile (about a third of its time, docs/kernels.md), and in fp8
it converts its tiles in a layout that the tensor cores' operands are then shuffled out of.
Here the scores are s^T = K q^T, [keys, heads]: the heads (8 for Llama-3.3-70B) are the mma's
N = 8, no padding, a key's parameters sit in the four lanes that hold its scores, loaded from
shared memory straight into that layout, and the accumulator is o^T = V^T p^T, [channels, heads].

K and V pages arrive by cp.async into a ring of shared slots as 16-bit words (bf16/fp16: a
channel; fp8: two; int4: four, kv/quant.py's word c holding channels c, c + D/4, c + D/2,
c + 3D/4), with int4's group parameters. ldmatrix brings K words into the A operand's registers
as they are and V words transposed (V^T is the A operand of the output's mma), two words to a
register, neighbours along the dot's reduction axis. Quantized words split there into phase
tiles of fp16: fp8 into two (channels 2c and 2c + 1, one prmt and the hardware's fp8x2 -> f16x2
conversion a pair), int4 into four (four ANDs and a shift, nibbles as fp16 subnormals: common.py's
INT4_PHASES_PTX); q is loaded in the phases' channel order, so the dots need no shuffle. A
program is one warp, so its softmax never leaves the warp and the ring's barrier is the warp's
own; many programs share an SM instead.

Heads of 64 or 128 channels; int4 heads of 2 or 4 groups (groups of D/2 or D/4 channels: a
group is whole phase tiles, and a key's parameters are 4 or 8 bytes, a cp.async's least); pages
of a power of two tokens, holding whole tiles or held whole in one.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from longserve.ops.triton.common import INT4_PHASES_PTX
from longserve.ops.triton.kv import INT4, PLAIN, PagedKV, warp_decode_serves

TINY = gl.constexpr(2.0**-24)  # an fp16 subnormal's unit: the phase tiles count in it


def serves(kv: PagedKV, dim: int, group: int) -> bool:
    """Whether this kernel takes a cache for heads of dim channels, group query heads a KV head
    (kv.py's warp_decode_serves)."""
    return warp_decode_serves(kv.fmt, dim, kv.group_size, kv.block_size, group)


def _fp8_ptx(fmt: str) -> gl.constexpr:
    """Two 16-bit fp8 words in a register (bytes a0 a1 b0 b1, low first) -> the f16x2 pairs
    (a0, b0) and (a1, b1): one prmt, two conversions."""
    cvt = f"cvt.rn.f16x2.{fmt}x2"
    return gl.constexpr(
        "{ .reg .b32 t; .reg .b16 lo, hi;\n"
        f"prmt.b32 t, $2, 0, 0x3120; mov.b32 {{lo, hi}}, t; {cvt} $0, lo; {cvt} $1, hi; }}"
    )


FP8_E4M3_PTX, FP8_E5M2_PTX = _fp8_ptx("e4m3"), _fp8_ptx("e5m2")


@gluon.jit
def _phases(w, FMT: gl.constexpr, E5: gl.constexpr):
    """The phase tiles of a tile of 16-bit words, pairs of words sharing a register. bf16/fp16
    (FMT 0): the tile itself. int4 (FMT 2): four fp16 tiles, nibble t of each word as
    nib x 2^-24 (t even) or nib x 2^-20 (t odd), exact. fp8: two, byte t of each word (channel
    2c + t) by the hardware's fp8x2 -> f16x2 conversion."""
    if FMT == 0:
        out = (w,)
    elif FMT == 2:
        out = gl.inline_asm_elementwise(
            INT4_PHASES_PTX, "=r,=r,=r,=r,r", [w], (gl.float16,) * 4, True, 2
        )
    else:
        out = gl.inline_asm_elementwise(
            FP8_E5M2_PTX if E5 else FP8_E4M3_PTX, "=r,=r,r", [w], (gl.float16,) * 2, True, 2
        )
    return out


@gluon.jit
def _columns(x, layout: gl.constexpr):
    """The G columns of a [keys, G] parameter tile (G in each thread's registers), as float32 in
    the key layout of the scores."""
    if x.shape[1] == 1:
        cols = (gl.reshape(x, [x.shape[0]]),)
    elif x.shape[1] == 2:
        cols = gl.split(x)
    else:
        a, b = gl.split(gl.reshape(x, [x.shape[0], 2, 2]))  # columns 0 and 2, 1 and 3
        a0, a2 = gl.split(a)
        b1, b3 = gl.split(b)
        cols = (a0, b1, a2, b3)
    out = ()
    for g in gl.static_range(x.shape[1]):
        out = out + (gl.convert_layout(cols[g].to(gl.float32), layout),)
    return out


@gluon.jit
def _tile(
    pages, n0, end, kvh, s_b, s_s, s_h,
    WIDTH: gl.constexpr, ALIGN: gl.constexpr, BS: gl.constexpr, BN: gl.constexpr,
    layout: gl.constexpr,
):  # fmt: skip
    """Offsets [BN, WIDTH] of tile keys n0 .. n0 + BN in one pool (strides s_b, s_s, s_h; rows
    at multiples of ALIGN elements), and the mask of keys before `end`. Tiles and pages nest (both
    powers of two, n0 a multiple of BN): where a tile holds whole pages, a key's row within its
    page is a constant of its lane; where a page holds whole tiles, the tile's rows follow on."""
    r = gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    col = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    row = ((n0 % BS + r) if BS > BN else r % BS) * s_s + kvh * s_h
    if ALIGN > 1:  # a hint, where the strides' own (Triton specializes multiples of 16) fall short
        row = gl.multiple_of(row, ALIGN)
    off = gl.expand_dims(row, 1) + gl.expand_dims(col, 0)
    return gl.expand_dims(pages * s_b, 1) + off, gl.expand_dims(n0 + r < end, 1)


@gluon.jit
def _pages(BT, bt_row, n0, end, BS: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
    """The page of each key of tile n0 .. n0 + BN (0 past `end`), on a copy layout's key axis."""
    r = gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    pages = gl.load(BT + bt_row + n0 // BS + r // BS, mask=n0 + r < end, other=0)
    return pages.to(gl.int64)


@gluon.jit
def _issue(
    rings, slot, K, V, KS, KZ, VS, VZ, pk, pp, n0, end, kvh,
    s_kb, s_ks, s_kh, s_pb, s_ps, s_ph,
    FMT: gl.constexpr, BS: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, G: gl.constexpr,
    cp: gl.constexpr, pcp: gl.constexpr,
):  # fmt: skip
    """cp.async of one tile's K and V words (and, int4, its four parameter tiles) into slot
    `slot` of the rings (K, V, K scales, K zeros, V scales, V zeros); keys at or past `end` are
    zero-filled. pk and pp: the tile's pages (_pages) in the two layouts, then commits them as
    one group."""
    kb, vb, ksb, kzb, vsb, vzb = rings
    off, mask = _tile(pk, n0, end, kvh, s_kb, s_ks, s_kh, W, 1, BS, BN, cp)
    async_copy.async_copy_global_to_shared(kb.index(slot), K + off, mask=mask)
    async_copy.async_copy_global_to_shared(vb.index(slot), V + off, mask=mask)
    if FMT == 2:
        off, mask = _tile(pp, n0, end, kvh, s_pb, s_ps, s_ph, G, G, BS, BN, pcp)
        async_copy.async_copy_global_to_shared(ksb.index(slot), KS + off, mask=mask)
        async_copy.async_copy_global_to_shared(kzb.index(slot), KZ + off, mask=mask)
        async_copy.async_copy_global_to_shared(vsb.index(slot), VS + off, mask=mask)
        async_copy.async_copy_global_to_shared(vzb.index(slot), VZ + off, mask=mask)
    async_copy.commit_group()


@gluon.jit
def _warp_decode_kernel(
    Q, K, V, KS, VS, KZ, VZ, s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, s_sh,
    BT, SEQ, OP, LP, sm_scale, num_splits,
    s_qt, s_qh, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
    FMT: gl.constexpr, E5: gl.constexpr, GROUP: gl.constexpr, GP: gl.constexpr,
    D: gl.constexpr, BS: gl.constexpr, BN: gl.constexpr, QGS: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    # FMT (kv.py): 0 bf16/fp16, 1 fp8, 2 int4. A key is W 16-bit words (a channel, two, four);
    # phase tile t of a [keys, W] word tile holds channel c * CS + t * TS of word c: every other
    # channel (fp8), a quarter of the head (int4), the channel itself (one tile, bf16/fp16)
    W: gl.constexpr = D if FMT == 0 else (D // 2 if FMT == 1 else D // 4)
    NPH: gl.constexpr = D // W
    CS: gl.constexpr = 2 if FMT == 1 else 1
    TS: gl.constexpr = 1 if FMT == 1 else W
    DT: gl.constexpr = K.dtype.element_ty if FMT == 0 else gl.float16  # the mma's inputs
    G: gl.constexpr = D // QGS  # int4 groups a head (bf16/fp16 and fp8: QGS = D, one)
    PPG: gl.constexpr = NPH // G  # phase tiles a group
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]
    )
    opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    opb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    keys: gl.constexpr = gl.SliceLayout(1, mma)
    heads: gl.constexpr = gl.SliceLayout(0, mma)
    # copies: 16-byte chunks of words; one key's parameters (4 or 8 bytes) a lane
    cp: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (W // 8), W // 8], [1, 1], [1, 0])
    pcp: gl.constexpr = gl.BlockedLayout([1, G], [32, 1], [1, 1], [1, 0])
    # parameter reads: key rows spread over lanes as the scores' rows are (lane / 4 + 8 i)
    prd: gl.constexpr = gl.BlockedLayout([1, G], [8, 4], [1, 1], [1, 0])
    qld: gl.constexpr = gl.BlockedLayout([1, GP], [32, 1], [1, 1], [1, 0])
    # rows of 2W bytes swizzled so that ldmatrix's eight rows hit distinct banks
    sw: gl.constexpr = gl.SwizzledSharedLayout(
        8, max(1, 128 // (2 * W)), min(8, 2 * W // 16), [1, 0]
    )
    psw: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    b = gl.program_id(0)
    kvh = gl.program_id(1)
    split = gl.program_id(2)
    seq_len = gl.load(SEQ + b)
    # whole tiles dealt out evenly, as decode.py's kernel does
    tiles = gl.cdiv(seq_len, BN)
    t0 = split * tiles // num_splits
    n_tiles = (split + 1) * tiles // num_splits - t0
    start = t0 * BN
    end = gl.minimum(start + n_tiles * BN, seq_len)
    bt_row = b * s_bt
    qk_scale = sm_scale * 1.4426950408889634

    # q^T as the B operand, one [W, GP] tile a phase; int4: odd phases divided by 16, and q's
    # sum over each group (the zero points' term), from the same fp16 values
    c = gl.arange(0, W, layout=gl.SliceLayout(1, qld))
    hq = gl.arange(0, GP, layout=gl.SliceLayout(0, qld))
    q_ptr = Q + b * s_qt + gl.expand_dims((kvh * GROUP + hq) * s_qh, 0) + gl.expand_dims(c * CS, 1)
    q_mask = gl.expand_dims(hq < GROUP, 0)
    qts = ()
    qsums = ()
    for g in gl.static_range(G):
        qsum = gl.zeros([GP], gl.float32, gl.SliceLayout(0, qld))
        for i in gl.static_range(PPG):
            qt = gl.load(q_ptr + (g * PPG + i) * TS, mask=q_mask, other=0.0).to(DT)
            if FMT == 2:
                qsum += gl.sum(qt.to(gl.float32), axis=0)
                qt = qt * (0.0625 if (g * PPG + i) % 2 else 1.0)
            qts = qts + (gl.convert_layout(qt.to(DT), opb),)
        qsums = qsums + (gl.convert_layout(qsum, heads) * TINY,)
    if FMT == 1:
        qk_scale = qk_scale * gl.load(KS + kvh * s_sh)

    kbuf = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BN, W], sw)
    vbuf = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BN, W], sw)
    if FMT == 2:
        ksb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, G], psw)
        kzb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, G], psw)
        vsb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, G], psw)
        vzb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, G], psw)
    else:  # no parameter tiles: _issue copies none
        ksb, kzb, vsb, vzb = kbuf, kbuf, kbuf, kbuf
    rings = (kbuf, vbuf, ksb, kzb, vsb, vzb)

    for i in gl.static_range(STAGES - 1):
        n0 = start + i * BN
        pk = _pages(BT, bt_row, n0, end, BS, BN, cp)
        pp = _pages(BT, bt_row, n0, end, BS, BN, pcp) if FMT == 2 else pk
        _issue(
            rings, i, K, V, KS, KZ, VS, VZ, pk, pp, n0, end, kvh,
            s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, FMT, BS, BN, W, G, cp, pcp,
        )  # fmt: skip
    # the pages of the next tile to issue are loaded one iteration ahead
    n_next = start + (STAGES - 1) * BN
    blk = _pages(BT, bt_row, n_next, end, BS, BN, cp)
    pblk = _pages(BT, bt_row, n_next, end, BS, BN, pcp) if FMT == 2 else blk

    m_i = gl.full([GP], float("-inf"), gl.float32, heads)
    l_acc = gl.zeros([BN, GP], gl.float32, mma)
    o0 = gl.zeros([W, GP], gl.float32, mma)
    o1 = gl.zeros([W, GP], gl.float32, mma)
    o2 = gl.zeros([W, GP], gl.float32, mma)
    o3 = gl.zeros([W, GP], gl.float32, mma)
    # int4: off0 .. off3, each key's p x scale x zero of group 0 .. 3 (p @ v's zero-point term)
    off0 = gl.zeros([BN, GP], gl.float32, mma)
    off1 = gl.zeros([BN, GP], gl.float32, mma)
    off2 = gl.zeros([BN, GP], gl.float32, mma)
    off3 = gl.zeros([BN, GP], gl.float32, mma)
    for j in range(n_tiles):
        slot = j % STAGES
        async_copy.wait_group(STAGES - 2)
        # every lane's copies of tile j have landed, and every read of the slot refilled next
        # (tile j - 1's) is done
        gl.thread_barrier()
        _issue(
            rings, (j + STAGES - 1) % STAGES, K, V, KS, KZ, VS, VZ, blk, pblk, n_next, end, kvh,
            s_kb, s_ks, s_kh, s_pb, s_ps, s_ph, FMT, BS, BN, W, G, cp, pcp,
        )  # fmt: skip
        n_next += BN
        blk = _pages(BT, bt_row, n_next, end, BS, BN, cp)
        if FMT == 2:
            pblk = _pages(BT, bt_row, n_next, end, BS, BN, pcp)

        ks = _phases(kbuf.index(slot).load(opa), FMT, E5)
        s = gl.zeros([BN, GP], gl.float32, mma)
        if FMT == 2:
            k_sc = _columns(ksb.index(slot).load(prd), keys)
            k_zr = _columns(kzb.index(slot).load(prd), keys)
            for g in gl.static_range(G):
                raw = gl.zeros([BN, GP], gl.float32, mma)
                for i in gl.static_range(PPG):
                    raw = mma_v2(ks[g * PPG + i], qts[g * PPG + i], raw)
                zq = gl.expand_dims(k_zr[g], 1) * gl.expand_dims(qsums[g], 0)
                sc = k_sc[g] * (qk_scale / TINY)
                s += (raw - zq) * gl.expand_dims(sc, 1)
        else:
            for t in gl.static_range(NPH):
                s = mma_v2(ks[t], qts[t], s)
            s = s * qk_scale
        if start + (j + 1) * BN > end:  # the slice's last tile, partial
            n = start + j * BN + gl.arange(0, BN, layout=keys)
            s = gl.where(gl.expand_dims(n < end, 1), s, float("-inf"))
        # the running max moves (and the sums rescale) only when a head's grew by more than 8:
        # until then p stays below 2^8, which fp16 and the fp32 sums hold exactly as well
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        if gl.max(m_new - m_i, axis=0) > 8.0:
            alpha = gl.expand_dims(gl.exp2(m_i - m_new), 0)
            l_acc = l_acc * alpha
            o0 = o0 * alpha
            if FMT != 0:
                o1 = o1 * alpha
            if FMT == 2:
                o2 = o2 * alpha
                o3 = o3 * alpha
                off0 = off0 * alpha
                off1 = off1 * alpha
                off2 = off2 * alpha
                off3 = off3 * alpha
            m_i = m_new
        p = gl.exp2(s - gl.expand_dims(m_i, 0))
        l_acc = l_acc + p

        vs = _phases(vbuf.index(slot).permute((1, 0)).load(opa), FMT, E5)
        if FMT == 2:
            v_sc = _columns(vsb.index(slot).load(prd), keys)
            v_zr = _columns(vzb.index(slot).load(prd), keys)
            for g in gl.static_range(G):
                pw = (p * gl.expand_dims(v_sc[g], 1)).to(gl.float16)
                zo = pw.to(gl.float32) * gl.expand_dims(v_zr[g], 1)
                if g == 0:
                    off0 = off0 + zo
                elif g == 1:
                    off1 = off1 + zo
                elif g == 2:
                    off2 = off2 + zo
                else:
                    off3 = off3 + zo
                pb = gl.convert_layout(pw, opb)
                for i in gl.static_range(PPG):
                    if g * PPG + i == 0:
                        o0 = mma_v2(vs[0], pb, o0)
                    elif g * PPG + i == 1:
                        o1 = mma_v2(vs[1], pb, o1)
                    elif g * PPG + i == 2:
                        o2 = mma_v2(vs[2], pb, o2)
                    else:
                        o3 = mma_v2(vs[3], pb, o3)
        else:
            pb = gl.convert_layout(p.to(DT), opb)
            o0 = mma_v2(vs[0], pb, o0)
            if FMT == 1:
                o1 = mma_v2(vs[1], pb, o1)
    async_copy.wait_group(0)

    l_i = gl.sum(l_acc, axis=0)
    inv = gl.where(l_i > 0, 1.0 / l_i, 0.0)
    lse = gl.where(l_i > 0, m_i + gl.log2(l_i), float("-inf"))
    h = gl.arange(0, GP, layout=heads)
    gl.store(LP + b * s_lb + (kvh * GROUP + h) * s_lh + split, lse, mask=h < GROUP)
    o_ptr = OP + b * s_ob + gl.expand_dims((kvh * GROUP + h) * s_oh, 0) + split * s_os
    o_ptr = o_ptr + gl.expand_dims(gl.arange(0, W, layout=keys) * CS, 1)
    o_mask = gl.expand_dims(h < GROUP, 0)
    if FMT == 2:
        offs = (
            gl.sum(off0, axis=0), gl.sum(off1, axis=0), gl.sum(off2, axis=0), gl.sum(off3, axis=0)
        )  # fmt: skip
        outs = (o0, o1, o2, o3)
        for t in gl.static_range(4):
            out = (
                outs[t] * (1.0 / (TINY * (16.0 if t % 2 else 1.0)))
                - gl.expand_dims(offs[t // PPG], 0)
            ) * gl.expand_dims(inv, 0)
            gl.store(o_ptr + t * TS, out, mask=o_mask)
    elif FMT == 1:
        inv = gl.expand_dims(inv * gl.load(VS + kvh * s_sh), 0)
        gl.store(o_ptr, o0 * inv, mask=o_mask)
        gl.store(o_ptr + TS, o1 * inv, mask=o_mask)
    else:
        gl.store(o_ptr, o0 * gl.expand_dims(inv, 0), mask=o_mask)


def warp_decode(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    op: torch.Tensor,
    lp: torch.Tensor,
    block_n: int,
    stages: int,
) -> None:
    """Slice partials of paged_decode into op [B, Hq, splits, D] and lp [B, Hq, splits], for the
    merge; splits = op.shape[2]; block_n keys a tile, stages ring slots (warp_decode_config)."""
    if block_n % kv.block_size and kv.block_size % block_n:
        raise ValueError(
            f"decode tiles of {block_n} keys and pages of {kv.block_size} must nest: one a "
            "multiple of the other"
        )
    batch, hq, dim = q.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    k, v, ks, vs, kz, vz, *strides, s_sh = kv.kernel_args()
    if kv.fmt != PLAIN:
        k, v = k.view(torch.int16), v.view(torch.int16)
    splits = op.shape[2]
    _warp_decode_kernel[(batch, hkv, splits)](
        q, k, v, ks, vs, kz, vz, *k.stride()[:3], *strides[3:6], s_sh,
        block_table, seq_lens, op, lp, sm_scale, splits,
        q.stride(0), q.stride(1), block_table.stride(0), *op.stride()[:3], *lp.stride()[:2],
        FMT=kv.fmt, E5=kv.k.dtype == torch.float8_e5m2, GROUP=group,
        GP=max(8, triton.next_power_of_2(group)), D=dim, BS=kv.block_size, BN=block_n,
        QGS=kv.group_size if kv.fmt == INT4 else dim, STAGES=stages, num_warps=1,
    )  # fmt: skip

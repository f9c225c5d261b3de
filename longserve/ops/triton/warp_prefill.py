"""Causal prefill on Hopper, warp-specialized (Gluon): FA3's scheme, over bf16/fp16 or fp8 keys.

A CTA computes BM queries of one head. One producer warp only issues TMA loads: the queries,
then the K and V tiles into a ring of buffers, each with a ready and an empty barrier. Two
consumer warpgroups take BM/2 query rows each and share every tile. A consumer issues the next
tile's q . k^T as an asynchronous wgmma before this tile's p @ v, and runs the softmax while
both are in flight, so the tensor cores are never idle on the softmax's account; Triton's own
pipeliner waits on each wgmma right after it is issued (docs/kernels.md).

Keys come from the step's own new K/V (causal_prefill, whole prompts in a bf16/fp16 cache: row
q0 + n of a sequence's keys) or from the paged pools (paged_prefill, chunks and prefix-cache hits
in pages of MIN_TMA_PAGE+ tokens, bf16/fp16 or fp8: a key tile is one TMA box of one page, the
pool laid out head by head).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from longserve.ops.triton.common import hopper
from longserve.ops.triton.kv import FP8, MIN_TMA_PAGE, PLAIN, PagedKV, prefill_config

# each consumer holds a score tile in flight beside the next, p and the output (at 232: spills)
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)  # the producer only computes addresses
FP8_STAGES = 2  # fp8 ring slots: with the two fp16 K and V slots, 224 KB of shared memory
MAXNREG = 168  # launch registers a thread: 12 warps (3 warpgroups) x 168 fill the SM's 64K


@gluon.jit
def _load_partition(
    q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
    q_row, h, kvh, key0, BT, bt_row, rpb, n_tiles,
    STAGES: gl.constexpr, BS: gl.constexpr, PAGED: gl.constexpr,
):  # fmt: skip
    """Queries first, then K and V tile by tile, each into its ring slot once both consumers have
    released it. Key tile j is row key0 + j x BN of the step's keys (from column kvh x D), or,
    PAGED, row page x rpb + key0 + (j x BN) % BS of the pool (key0: the head's offset)."""
    HM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    for w in gl.static_range(2):
        mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [q_row + w * HM, h * D], q_bar.index(w), q_bufs.index(w)
        )
    col = 0 if PAGED else kvh * D
    for j in range(n_tiles):
        s = j % STAGES
        phase = (j // STAGES) & 1
        if PAGED:
            page = gl.load(BT + bt_row + j * BN // BS)
            row = page * rpb + key0 + j * BN % BS
        else:
            row = key0 + j * BN
        # a slot starts empty: its first wait (phase 1) passes at once
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, col], k_ready.index(s), k_bufs.index(s))
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, col], v_ready.index(s), v_bufs.index(s))


@gluon.jit
def _half_to_f16(src, dst, ready, empty, f_ready, f_empty, t, WG: gl.constexpr):
    """This warpgroup's half of tile t's rows from its fp8 ring slot into the shared fp16 slot
    t % 2 (fp8 converts to fp16 exactly), 32 rows at a time, once both consumers have released that slot's
    previous tile; then it releases the fp8 slot and marks its half ready. The fence and the
    warpgroup's barrier order every thread's stores before the arrivals."""
    STAGES: gl.constexpr = src.type.shape[0]
    HALF: gl.constexpr = src.type.shape[1] // 2
    ROWS: gl.constexpr = 32 if HALF > 32 else HALF  # rows converted at a time
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
    slot = t % STAGES
    mbarrier.wait(f_empty.index(t % 2), ((t // 2) & 1) ^ 1)
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    raw = src.index(slot)
    f16 = dst.index(t % 2)
    for r in gl.static_range(WG * HALF, (WG + 1) * HALF, ROWS):
        f16.slice(r, ROWS).store(raw.slice(r, ROWS).load(layout).to(gl.float16))
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(empty.index(slot), count=1)
    mbarrier.arrive(f_ready.index(t % 2), count=1)


@gluon.jit
def _softmax_partition(
    q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
    k16, v16, k16_ready, k16_empty, v16_ready, v16_empty,
    OUT, s_ot, s_oh, h, q0, m0, prefix, n_q, n_tiles, qk_scale, v_scale,
    WG: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr,
):  # fmt: skip
    """Queries m0 + WG x HM .. of the sequence's n_q (at positions prefix + those), online
    softmax over n_tiles key tiles, causal; rows past the sequence are computed (they see key 0
    at least, so stay finite) and not stored.

    FP8: the ring holds fp8 tiles; the two consumers convert each into shared fp16 tiles, two K
    and two V slots (k16, v16, with their ready/empty barriers), half the rows each, and the
    dots run in fp16 (q converted too, in place). K_j+1 is converted once q . K_j^T is in, V_j
    while q . K_j+1^T runs. Half the rows each: an A/B on the H200 against each consumer
    converting whole tiles into its own: 444-447 against 386-391 TFLOP/s in pages of 128."""
    HM: gl.constexpr = q_bufs.type.shape[1]
    D: gl.constexpr = q_bufs.type.shape[2]
    BN: gl.constexpr = k_bufs.type.shape[1]
    dtype: gl.constexpr = gl.float16 if FP8 else q_bufs.dtype
    first = prefix + m0 + WG * HM  # the position of the warpgroup's first query
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pos = gl.expand_dims(first + gl.arange(0, HM, layout=gl.SliceLayout(1, s_layout)), 1)
    cols = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)), 0)
    q = q_bufs.index(WG)
    zero = gl.zeros([HM, BN], gl.float32, s_layout)
    mbarrier.wait(q_bar.index(WG), 0)

    if FP8:
        q16 = q._reinterpret(gl.float16, [HM, D], k16.layout)
        q16.store(q.load(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])).to(gl.float16))
        fence_async_shared()
        gl.thread_barrier()
        q = q16
        _half_to_f16(k_bufs, k16, k_ready, k_empty, k16_ready, k16_empty, 0, WG)
        if n_tiles > 1:
            _half_to_f16(k_bufs, k16, k_ready, k_empty, k16_ready, k16_empty, 1, WG)
        mbarrier.wait(k16_ready.index(0), 0)
        s = warpgroup_mma(q, k16.index(0).permute((1, 0)), zero, use_acc=False)
        mbarrier.arrive(k16_empty.index(0), count=1)
    else:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
    if first < BN - 1:  # the tile reaches past the first query: mask
        s = gl.where(pos >= cols, s, float("-inf"))
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    acc = gl.zeros([HM, D], gl.float32, o_layout)
    for j in range(1, n_tiles):
        if FP8:
            mbarrier.wait(k16_ready.index(j % 2), (j // 2) & 1)
            kt = k16.index(j % 2)
        else:
            mbarrier.wait(k_ready.index(j % STAGES), (j // STAGES) & 1)
            kt = k_bufs.index(j % STAGES)
        s = warpgroup_mma(q, kt.permute((1, 0)), zero, use_acc=False, is_async=True)
        if FP8:
            _half_to_f16(v_bufs, v16, v_ready, v_empty, v16_ready, v16_empty, j - 1, WG)
            mbarrier.wait(v16_ready.index((j - 1) % 2), ((j - 1) // 2) & 1)
            vt = v16.index((j - 1) % 2)
        else:
            mbarrier.wait(v_ready.index((j - 1) % STAGES), ((j - 1) // STAGES) & 1)
            vt = v_bufs.index((j - 1) % STAGES)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), vt, acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))  # this tile's scores; p @ v still in flight
        if FP8:
            mbarrier.arrive(k16_empty.index(j % 2), count=1)
            if j + 1 < n_tiles:
                _half_to_f16(k_bufs, k16, k_ready, k_empty, k16_ready, k16_empty, j + 1, WG)
        else:
            mbarrier.arrive(k_empty.index(j % STAGES), count=1)
        if first < (j + 1) * BN - 1:
            s = gl.where(pos >= j * BN + cols, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=(acc,))
        if FP8:
            mbarrier.arrive(v16_empty.index((j - 1) % 2), count=1)
        else:
            mbarrier.arrive(v_empty.index((j - 1) % STAGES), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    last = n_tiles - 1
    if FP8:
        _half_to_f16(v_bufs, v16, v_ready, v_empty, v16_ready, v16_empty, last, WG)
        mbarrier.wait(v16_ready.index(last % 2), (last // 2) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v16.index(last % 2), acc)
        mbarrier.arrive(v16_empty.index(last % 2), count=1)
    else:
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(
            gl.convert_layout(p.to(dtype), p_layout), v_bufs.index(last % STAGES), acc
        )
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)

    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = m0 + WG * HM + gl.arange(0, HM, layout=o_rows)
    out = acc * gl.expand_dims(v_scale / gl.convert_layout(l_i, o_rows), 1)
    d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)), 0)
    ptr = OUT + gl.expand_dims((q0 + rows).to(gl.int64) * s_ot + h * s_oh, 1) + d
    gl.store(ptr, out.to(OUT.dtype.element_ty), mask=gl.expand_dims(rows < n_q, 1))


@gluon.jit
def _warp_prefill_kernel(
    q_desc, k_desc, v_desc, OUT, CUQ, SEQ, BT, qk_scale, s_ot, s_oh, s_bt, rpb, s_head, at_least,
    KS, VS, s_sh,
    GROUP: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr, PAGED: gl.constexpr,
    FP8: gl.constexpr,
):  # fmt: skip
    # one CTA: 2 x HM consecutive queries of one head of one sequence, the grid's last first
    # (longest causal work first)
    HM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    b = gl.program_id(1)
    h = gl.program_id(2)
    q0 = gl.load(CUQ + b)
    n_q = gl.load(CUQ + b + 1) - q0
    m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * 2 * HM
    if m0 < n_q and n_q >= at_least:
        kvh = h // GROUP
        if PAGED:  # the queries are the last n_q of the context, in the pool's pages
            prefix = gl.load(SEQ + b) - n_q
            key0 = kvh * s_head
        else:  # a whole prompt: its keys are the step's rows of its queries
            prefix = gl.to_tensor(0)
            key0 = q0
        n_tiles = gl.cdiv(prefix + gl.minimum(m0 + 2 * HM, n_q), BN)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, HM, D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
        bar: gl.constexpr = mbarrier.MBarrierLayout()
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        for w in gl.static_range(2):
            mbarrier.init(q_bar.index(w), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrival from each consumer
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        # fp8: shared fp16 K and V tiles, two slots each, with ready/empty barriers that both
        # consumers arrive on; K's scale joins the softmax's, V's the output
        if FP8:
            f16: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], gl.float16)
            k16 = gl.allocate_shared_memory(gl.float16, [2, BN, D], f16)
            v16 = gl.allocate_shared_memory(gl.float16, [2, BN, D], f16)
            k16_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
            k16_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
            v16_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
            v16_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
            for f in gl.static_range(2):
                mbarrier.init(k16_ready.index(f), count=2)
                mbarrier.init(k16_empty.index(f), count=2)
                mbarrier.init(v16_ready.index(f), count=2)
                mbarrier.init(v16_empty.index(f), count=2)
            qk_scale *= gl.load(KS + kvh * s_sh)
            v_scale = gl.load(VS + kvh * s_sh)
        else:  # unused
            k16 = k_bufs
            v16 = v_bufs
            k16_ready = q_bar
            k16_empty = q_bar
            v16_ready = q_bar
            v16_empty = q_bar
            v_scale = gl.to_tensor(1.0)
        fence_async_shared()
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        # (tuples written out: a concatenated one would carry the constexprs as plain ints)
        # fmt: off
        gl.warp_specialize(
            [
                (_softmax_partition, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                                      v_empty, k16, v16, k16_ready, k16_empty, v16_ready,
                                      v16_empty, OUT, s_ot, s_oh, h, q0, m0, prefix, n_q,
                                      n_tiles, qk_scale, v_scale, WG0, STAGES, FP8)),
                (_softmax_partition, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                                      v_empty, k16, v16, k16_ready, k16_empty, v16_ready,
                                      v16_empty, OUT, s_ot, s_oh, h, q0, m0, prefix, n_q,
                                      n_tiles, qk_scale, v_scale, WG1, STAGES, FP8)),
                (_load_partition, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready,
                                   k_empty, v_ready, v_empty, q0 + m0, h, kvh, key0, BT, b * s_bt,
                                   rpb, n_tiles, STAGES, BS, PAGED)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )
        # fmt: on


_GL_DTYPES = {
    torch.bfloat16: gl.bfloat16,
    torch.float16: gl.float16,
    torch.float8_e4m3fn: gl.float8e4nv,
    torch.float8_e5m2: gl.float8e5,
}


def _desc(
    x: torch.Tensor, shape: list[int], strides: list[int], block: list[int]
) -> TensorDescriptor:
    """A 2-D descriptor over x's memory, in `block` tiles with the swizzled layout wgmma reads."""
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[x.dtype])
    return TensorDescriptor(x, shape, strides, block, layout)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    sm_scale: float,
    config: dict | None,
    out: torch.Tensor | None,
    at_least: int,
    pages: tuple[torch.Tensor, torch.Tensor, PagedKV] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's queries q [T, Hq, D] (rows side by side, checked by
    the caller) over k/v: the step's own keys [T, Hkv, D], or, with pages (block table, seq
    lens, the cache's view), its pools [blocks, BS, Hkv, D] laid out head by head, bf16/fp16 or
    fp8. BM queries a CTA, BN keys a tile (at most a page), num_stages ring slots (fp8:
    FP8_STAGES), from config (prefill_config by default)."""
    _, hq, dim = q.shape
    config = config or prefill_config()
    out = torch.empty_like(q) if out is None else out
    bm, stages = config["BM"], config["num_stages"]
    qd = _desc(q, [q.shape[0], hq * dim], [q.stride(0), 1], [bm // 2, dim])
    if pages is None:
        bn, hkv = config["BN"], k.shape[1]
        kd, vd = (_desc(x, [x.shape[0], hkv * dim], [x.stride(0), 1], [bn, dim]) for x in (k, v))
        table, seq_lens, bs = cu_seqlens_q, cu_seqlens_q, bn  # unused by the contiguous kernel
        paged, fp8 = (0, 0, 0), False
    else:
        table, seq_lens, kv = pages
        bs, fp8 = kv.block_size, kv.fmt == FP8
        bn, hkv = min(config["BN"], bs), k.shape[2]
        kd, vd = (
            _desc(x, [x.shape[0] * x.stride(0) // dim, dim], [dim, 1], [bn, dim]) for x in (k, v)
        )
        paged = (table.stride(0), k.stride(0) // dim, k.stride(2) // dim)
    scales = (kv.k_scale, kv.v_scale, kv.k_scale.stride(0)) if fp8 else (q, q, 0)
    grid = (triton.cdiv(max_query_len, bm), cu_seqlens_q.shape[0] - 1, hq)
    _warp_prefill_kernel[grid](
        qd, kd, vd, out, cu_seqlens_q, seq_lens, table, sm_scale * 1.4426950408889634,
        out.stride(0), out.stride(1), *paged, at_least, *scales, GROUP=hq // hkv,
        STAGES=FP8_STAGES if fp8 else stages, BS=bs, PAGED=pages is not None, FP8=fp8,
        num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
    return out


def _tma_rows(x: torch.Tensor) -> bool:
    """[T, heads, D] with each token's heads side by side, channels contiguous, rows and start on
    16 bytes: what a TMA descriptor over [T, heads x D] takes."""
    aligned = x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0
    return x.stride(2) == 1 and x.stride(1) == x.shape[2] and aligned


def _check_rows(x: torch.Tensor) -> None:
    if not _tma_rows(x):
        raise ValueError(
            "the TMA prefill kernels need each token's heads side by side, channels contiguous,"
            " and rows on 16 bytes"
        )


def _head_pages(pool: torch.Tensor) -> bool:
    """[blocks, BS, heads, D] whose memory holds each block head by head (paged_pool), channels
    contiguous, on 16 bytes: the pool is then rows of D, a page's rows of one head together."""
    _, _, _, dim = pool.shape
    rows = pool.stride(1) == dim and pool.stride(3) == 1
    whole = pool.stride(0) % dim == 0 and pool.stride(2) % dim == 0
    return rows and whole and pool.data_ptr() % 16 == 0 and dim * pool.element_size() % 16 == 0


def reads_new_kv(q: torch.Tensor, kv: PagedKV, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether causal_prefill serves the step's whole prompts: the cache holds the new keys as
    they are (bf16/fp16 of k's dtype), the GPU has TMA and the tensors suit its descriptors."""
    return (
        kv.fmt == PLAIN
        and kv.k.dtype == k.dtype
        and q.is_cuda
        and hopper(q.device.index)
        and all(_tma_rows(x) for x in (q, k, v))
    )


def reads_pages(q: torch.Tensor, kv: PagedKV) -> bool:
    """Whether paged_prefill serves the step: a bf16/fp16 cache of q's dtype or an fp8 one, in
    pages of 64 tokens or more (a key tile is one box of one page), head by head, on a GPU with
    TMA."""
    return (
        (kv.fmt == FP8 or (kv.fmt == PLAIN and kv.k.dtype == q.dtype))
        and kv.block_size >= MIN_TMA_PAGE
        and q.is_cuda
        and hopper(q.device.index)
        and _tma_rows(q)
        and _head_pages(kv.k)
    )


def causal_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    sm_scale: float,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    at_least: int = 0,
) -> torch.Tensor:
    """Causal attention of whole prompts over their own keys: q [T, Hq, D], k/v [T, Hkv, D]
    (the step's new tokens, nothing cached before them) -> out [T, Hq, D]. Hopper and later.
    Only sequences with at_least queries are computed (into out, if given)."""
    for x in (q, k, v):
        _check_rows(x)
    return _launch(q, k, v, cu_seqlens_q, max_query_len, sm_scale, config, out, at_least)


def paged_prefill(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    sm_scale: float,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    at_least: int = 0,
) -> torch.Tensor:
    """paged_extend's attention (each sequence's queries the last of its context: chunked
    prefill, prefix-cache hits) for a bf16/fp16 or fp8 cache in pages of MIN_TMA_PAGE tokens or
    more, each key tile of one head read as one TMA box of one page; key tiles are capped at the
    page. Hopper and later. Only sequences with at_least queries are computed (into out, if
    given)."""
    _check_rows(q)
    rows = (cu_seqlens_q, max_query_len, sm_scale, config, out, at_least)
    return _launch(q, kv.k, kv.v, *rows, pages=(block_table, seq_lens, kv))

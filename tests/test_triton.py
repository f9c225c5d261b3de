"""The Triton kernels against torch references, in every KV format.

On CUDA the full sweep of awkward shapes runs (marked gpu). Without CUDA, where Triton is
installed, a few small cases run under Triton's interpreter; without Triton, all are skipped.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
pytest.importorskip("triton")

if not CUDA:
    import triton.runtime.interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope) -> None:  # noqa: ANN001
        """Triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses."""
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

from longserve.kv import quant  # noqa: E402
from longserve.kv.cache import paged_pool  # noqa: E402
from longserve.ops.triton import (  # noqa: E402
    PagedKV,
    causal_prefill,
    paged_decode,
    paged_extend,
    paged_prefill,
    reads_pages,
    store_kv,
    warp_decode,
)

DEV = torch.device("cuda" if CUDA else "cpu")
FORMATS = ["bf16", "fp16", "fp8_e4m3/per_tensor", "fp8_e4m3/per_head", "fp8_e5m2/per_head", "int4"]
FORMATS += ["int4/16", "int4/32"]  # groups within a quarter of the head, or whole quarters
BS = 16


def _gpu_only(params: list, cpu: int = 3) -> list:
    """Cases past the first `cpu` run on CUDA only: the interpreter is slow."""
    return [p if i < cpu else pytest.param(*p, marks=pytest.mark.gpu) for i, p in enumerate(params)]


def _skip_gpu_case(request) -> None:  # noqa: ANN001
    if not CUDA and request.node.get_closest_marker("gpu"):
        pytest.skip("needs CUDA")


def random_cache(
    fmt: str,
    blocks: int,
    heads: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    engine_layout: bool = True,
    bs: int = BS,
) -> tuple:
    """Random paged K/V in a format, and the same values dequantized: [blocks*bs, heads, dim].

    The pools are laid out as the engine's cache lays them out (paged_pool), or contiguous."""
    name, _, gran = fmt.partition("/")
    shape = (blocks, bs, heads, dim)

    def pool(x: torch.Tensor) -> torch.Tensor:
        if not engine_layout:
            return x.to(DEV)
        return paged_pool(*x.shape, x.dtype, DEV).copy_(x)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen)

    if name in ("bf16", "fp16"):
        dt = torch.bfloat16 if name == "bf16" else torch.float16
        k, v = rnd(*shape).to(dt), rnd(*shape).to(dt)
        ref = (k.float(), v.float())
        kv = PagedKV(pool(k), pool(v))
    elif name.startswith("fp8"):
        dt = quant.kv_format(name).storage
        n = heads if gran == "per_head" else 1
        ks, vs = torch.rand(n, generator=gen) + 0.05, torch.rand(n, generator=gen) + 0.05
        k, v = (rnd(*shape) * 4).to(dt), (rnd(*shape) * 4).to(dt)
        ref = (k.float() * ks.view(-1, 1), v.float() * vs.view(-1, 1))
        ks, vs = (ks if n > 1 else ks[0]), (vs if n > 1 else vs[0])
        kv = PagedKV(pool(k), pool(v), ks.to(DEV), vs.to(DEV))
    else:  # int4, or int4/<group size>
        g = int(gran or quant.INT4_GROUP_SIZE)
        pools, ref = [], []
        for _ in range(2):
            packed = torch.randint(0, 256, (*shape[:3], dim // 2), dtype=torch.uint8, generator=gen)
            scale = (torch.rand(*shape[:3], dim // g, generator=gen) * 0.2 + 0.01).half()
            zero = (torch.rand(*shape[:3], dim // g, generator=gen) * 15).half()
            x = quant.dequantize_int4(packed.flatten(0, 2)[:, None], scale.flatten(0, 2)[:, None],
                                      zero.flatten(0, 2)[:, None], torch.float32)  # fmt: skip
            pools.append((pool(packed), pool(scale), pool(zero)))
            ref.append(x.reshape(shape))
        (k, ks, kz), (v, vs, vz) = pools
        kv = PagedKV(k, v, ks, vs, kz, vz, group_size=g)
    # the kernels compute in the model dtype: reference K/V are rounded to it as well
    ref = tuple(r.to(dtype).float().flatten(0, 1) for r in ref)
    return kv, ref


def ref_attention(q, k, v, lens, qlens, tables, scale, bs=BS):  # noqa: ANN001, ANN201
    """float32 SDPA per sequence over its gathered context, queries at the end of it."""
    out, s = [], 0
    for i, (ctx, n) in enumerate(zip(lens, qlens, strict=True)):
        slots = (tables[i][: -(-ctx // bs)].unsqueeze(1) * bs + torch.arange(bs)).flatten()[:ctx]
        ki, vi = k[slots].transpose(0, 1), v[slots].transpose(0, 1)
        qi = q[s : s + n].float().cpu().transpose(0, 1)
        mask = torch.arange(ctx) <= torch.arange(ctx - n, ctx).unsqueeze(1)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o.transpose(0, 1))
        s += n
    return torch.cat(out)


def make_batch(
    lens: list[int],
    qlens: list[int],
    hq: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    bs: int = BS,
) -> tuple:
    """Queries and shuffled, padded block tables for sequences of the given lengths."""
    need = [-(-n // bs) for n in lens]
    ids = torch.randperm(sum(need) + 3, generator=gen)
    tables, at = [], 0
    width = max(need) + 2
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(need):
        tables.append(ids[at : at + n])
        table[i, :n] = ids[at : at + n].int()
        at += n
    q = torch.randn(sum(qlens), hq, dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + qlens).cumsum(0).int()
    seq = torch.tensor(lens, dtype=torch.int32)
    return q, tables, table.to(DEV), seq.to(DEV), cu.to(DEV), sum(need) + 3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.float().cpu() - ref).norm() / ref.norm())


DECODE = _gpu_only(
    [
        (8, 1, 64, [37], "int4"),
        (4, 4, 64, [17, 70], "fp8_e4m3/per_head"),
        (3, 1, 64, [5, 33, 64], "bf16"),
        (8, 2, 128, [40], "int4/16"),
        (8, 2, 128, [70, 3], "int4/128"),  # one group a head: the one masked loop
    ]
    + [
        (hq, hkv, d, lens, f)
        for f in FORMATS
        for hq, hkv, d, lens in [
            (8, 8, 128, [1, 4097]),
            (24, 8, 64, [100, 16, 17, 1000]),
            (56, 8, 128, [3000]),
            (64, 8, 128, [random.Random(b).randint(1, 3000) for b in range(64)]),
            (64, 8, 128, [131071]),
            (32, 4, 64, [random.Random(b).randint(1, 9000) for b in range(33)]),
        ]
    ],
    cpu=5,
)


@pytest.mark.parametrize("hq,hkv,dim,lens,fmt", DECODE)
def test_paged_decode(request, hq, hkv, dim, lens, fmt):
    _skip_gpu_case(request)
    gen = torch.Generator().manual_seed(len(lens) * 1000 + dim + hq)
    dtype = torch.bfloat16 if CUDA and fmt != "fp16" else torch.float16  # interpreter: no bf16 dot
    q, tables, table, seq, _, blocks = make_batch(lens, [1] * len(lens), hq, dim, dtype, gen)
    kv, (k, v) = random_cache(fmt, blocks, hkv, dim, dtype, gen)
    scale = dim**-0.5
    out = paged_decode(q.to(DEV), kv, table, seq, scale, max(lens))
    ref = ref_attention(q, k, v, lens, [1] * len(lens), tables, scale)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    "fmt", ["bf16", "int4", pytest.param("fp8_e4m3/per_head", marks=pytest.mark.gpu)]
)
def test_decode_reads_any_pool_layout(request, fmt):
    """The kernels take the pools' strides: contiguous pools give the engine layout's bits."""
    _skip_gpu_case(request)
    outs = []
    for engine_layout in (True, False):
        gen = torch.Generator().manual_seed(7)
        dtype = torch.bfloat16 if CUDA else torch.float16
        q, _, table, seq, _, blocks = make_batch([45, 20], [1, 1], 8, 64, dtype, gen)
        kv, _ = random_cache(fmt, blocks, 2, 64, dtype, gen, engine_layout)
        assert kv.k.is_contiguous() != engine_layout
        outs.append(paged_decode(q.to(DEV), kv, table, seq, 0.125, 45))
    assert torch.equal(*outs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "int4/32", "bf16", "fp8_e4m3/per_head"])
@pytest.mark.parametrize("bs", [8, 12, 32, 64, 128])
def test_paged_decode_page_sizes(request, fmt, bs):
    """Pages other than the engine's default 16: on Hopper, powers of two take warp_decode.py's
    kernel, tiles of whole pages (8, 32 against tiles of 32 or 64 keys) or pages of whole tiles
    (64, 128); pages of 12 take decode.py's."""
    _skip_gpu_case(request)
    lens = [3000, 1, 129, 2048]
    gen = torch.Generator().manual_seed(bs)
    q, tables, table, seq, _, blocks = make_batch(lens, [1] * 4, 64, 128, torch.bfloat16, gen, bs)
    kv, (k, v) = random_cache(fmt, blocks, 8, 128, torch.bfloat16, gen, bs=bs)
    out = paged_decode(q.to(DEV), kv, table, seq, 128**-0.5, max(lens))
    ref = ref_attention(q, k, v, lens, [1] * 4, tables, 128**-0.5, bs)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    "fmt,dim,group,bs,served",
    [
        ("int4", 128, 64, 16, True),
        ("int4", 128, 64, 64, True),  # pages of whole tiles
        ("int4", 128, 32, 16, True),
        ("int4", 64, 16, 16, True),
        ("int4", 128, 128, 16, False),  # one group a head: a key's parameter is under 4 bytes
        ("int4", 128, 16, 16, False),  # 8 groups
        ("int4", 128, 64, 12, False),  # not a power of two
        ("bf16", 128, 64, 16, True),
        ("bf16", 64, 64, 256, True),
        ("bf16", 256, 64, 16, False),  # heads of 256 channels
        ("fp8_e4m3/per_head", 128, 64, 16, True),
        ("fp8_e4m3/per_head", 128, 64, 12, False),
    ],
)
def test_warp_decode_serves(fmt, dim, group, bs, served):
    """Which caches take the Gluon decode kernel on Hopper; the rest take decode.py's."""
    gen = torch.Generator().manual_seed(0)
    kv, _ = random_cache(
        fmt if fmt != "int4" else f"int4/{group}", 2, 2, dim, torch.float16, gen, bs=bs
    )
    assert warp_decode.serves(kv, dim, 8) == served
    assert not warp_decode.serves(kv, dim, 32)  # past the mma's N of 16 heads


def test_warp_decode_refuses_pages_that_do_not_nest():
    """Its addressing takes tiles of whole pages or pages of whole tiles: a launch whose tiles
    and pages do not nest is refused up front."""
    gen = torch.Generator().manual_seed(0)
    kv, _ = random_cache("bf16", 4, 2, 128, torch.float16, gen, bs=12)
    q = torch.zeros(1, 16, 128, dtype=torch.float16)
    op, lp = torch.empty(1, 16, 1, 128), torch.empty(1, 16, 1)
    table, seq = torch.zeros(1, 4, dtype=torch.int32), torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ValueError, match="must nest"):
        warp_decode.warp_decode(q, kv, table, seq, 0.1, op, lp, block_n=32, stages=3)


EXTEND = _gpu_only(
    [
        (8, 2, 64, [40, 21], [40, 5], "int4"),
        (6, 2, 64, [50], [19], "fp8_e5m2/per_head"),
        (7, 1, 64, [33, 1, 18], [33, 1, 2], "fp16"),
    ]
    + [
        (hq, hkv, d, lens, qlens, f)
        for f in FORMATS
        for hq, hkv, d, lens, qlens in [
            (8, 8, 128, [300, 77], [300, 1]),
            (24, 8, 64, [1000, 513, 16, 2], [200, 513, 1, 2]),
            (56, 8, 128, [2049], [2049]),
            (64, 8, 128, [5000, 4000, 1, 37], [100, 4000, 1, 1]),
        ]
    ]
)


@pytest.mark.parametrize("hq,hkv,dim,lens,qlens,fmt", EXTEND)
def test_paged_extend(request, hq, hkv, dim, lens, qlens, fmt):
    _skip_gpu_case(request)
    gen = torch.Generator().manual_seed(sum(lens) + dim + hq)
    dtype = torch.bfloat16 if CUDA and fmt != "fp16" else torch.float16  # interpreter: no bf16 dot
    q, tables, table, seq, cu, blocks = make_batch(lens, qlens, hq, dim, dtype, gen)
    kv, (k, v) = random_cache(fmt, blocks, hkv, dim, dtype, gen)
    scale = dim**-0.5
    out = paged_extend(q.to(DEV), kv, table, seq, cu, max(qlens), scale)
    ref = ref_attention(q, k, v, lens, qlens, tables, scale)
    assert rel_err(out, ref) < 1e-2


# causal_prefill is a Gluon kernel, which the interpreter does not run: CUDA only
PREFILL = _gpu_only(
    [(8, 8, 64, [130, 5]), (6, 2, 64, [40, 1]), (7, 1, 64, [129])]
    + [
        (64, 8, 128, [4000, 1, 300, 129]),
        (24, 8, 64, [1000, 513, 16, 2]),
        (56, 8, 128, [2049]),
        (21, 3, 128, [127, 128, 255, 256, 257]),
        (8, 8, 128, [random.Random(b).randint(1, 700) for b in range(40)]),
    ],
    cpu=0,
)


@pytest.mark.parametrize("hq,hkv,dim,qlens", PREFILL)
def test_causal_prefill(request, hq, hkv, dim, qlens):
    """Whole prompts over their own keys, read from views of one fused qkv buffer (as a model's
    projections may leave them), against float32 SDPA per prompt."""
    _skip_gpu_case(request)
    gen = torch.Generator().manual_seed(sum(qlens) + dim + hq)
    dtype = torch.bfloat16
    qkv = torch.randn(sum(qlens), hq + 2 * hkv, dim, generator=gen).to(dtype)
    q, k, v = qkv.to(DEV).split([hq, hkv, hkv], 1)
    cu = torch.tensor([0] + qlens).cumsum(0).int()
    out = causal_prefill(q, k, v, cu.to(DEV), max(qlens), dim**-0.5)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qi, ki, vi = (x[s:e].float().transpose(0, 1) for x in qkv.split([hq, hkv, hkv], 1))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        ref.append(o.transpose(0, 1))
    assert rel_err(out, torch.cat(ref)) < 1e-2


def test_causal_prefill_refuses_what_tma_cannot_read():
    q = torch.zeros(4, 2, 64, dtype=torch.float16, device=DEV)
    cu = torch.tensor([0, 4], device=DEV)
    with pytest.raises(ValueError, match="side by side"):
        causal_prefill(q, q.transpose(0, 1), q, cu, 4, 0.125)
    odd = torch.zeros(4 * 129 + 1, dtype=torch.float16, device=DEV)[1:].view(4, 129)[:, :128]
    with pytest.raises(ValueError, match="16 bytes"):  # rows of 129 halves: not on 16 bytes
        causal_prefill(q, odd.view(4, 2, 64), q, cu, 4, 0.125)


# paged_prefill is the Gluon kernel too: CUDA only
PAGED_PREFILL = _gpu_only(
    [
        (8, 2, 64, 64, [300, 77, 40], [200, 77, 1], "fp16"),
        (3, 1, 64, 128, [500, 129], [129, 129], "fp16"),
        (6, 2, 64, 64, [200, 3], [130, 1], "fp8_e5m2/per_head"),
    ]
    + [
        (hq, hkv, d, bs, lens, qlens, f)
        for f in ("bf16", "fp16", "fp8_e4m3/per_tensor", "fp8_e4m3/per_head")
        for hq, hkv, d, bs, lens, qlens in [
            (8, 8, 128, 64, [300, 77], [300, 1]),
            (24, 8, 64, 64, [1000, 513, 16, 2], [200, 513, 1, 2]),
            (56, 8, 128, 256, [2049], [2049]),
            (21, 3, 128, 128, [127, 128, 255, 256, 257], [127, 128, 130, 256, 129]),
            (64, 8, 128, 128, [5000, 4000, 1, 37], [1000, 4000, 1, 1]),
        ]
    ],
    cpu=0,
)


@pytest.mark.parametrize("hq,hkv,dim,bs,lens,qlens,fmt", PAGED_PREFILL)
def test_paged_prefill_splits_a_step_with_paged_extend(request, hq, hkv, dim, bs, lens, qlens, fmt):
    """Chunks over their context in pages of 64+ tokens read by TMA (bf16/fp16 or fp8, converted
    in the kernel), the step split as the engine splits it: sequences that bring 128 queries or
    more here, the rest (decode rows, short chunks) through paged_extend into the same output."""
    _skip_gpu_case(request)
    gen = torch.Generator().manual_seed(sum(lens) + dim + hq + bs)
    dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
    q, tables, table, seq, cu, blocks = make_batch(lens, qlens, hq, dim, dtype, gen, bs)
    kv, (k, v) = random_cache(fmt, blocks, hkv, dim, dtype, gen, bs=bs)
    scale = dim**-0.5
    args = (table, seq, cu, max(qlens), scale)
    out = paged_prefill(q.to(DEV), kv, *args, at_least=128)
    out = paged_extend(q.to(DEV), kv, *args, out=out, fewer_than=128)
    ref = ref_attention(q, k, v, lens, qlens, tables, scale, bs)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_paged_prefill_takes_only_pools_tma_can_read():
    """bf16/fp16 (q's dtype) or fp8 pools of 64+ token pages laid out head by head; not pages of
    16, other layouts, or int4 (those take paged_extend)."""
    if not CUDA:
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(3)
    q = torch.zeros(4, 8, 64, dtype=torch.bfloat16, device=DEV)
    assert reads_pages(q, random_cache("bf16", 4, 2, 64, q.dtype, gen, bs=64)[0])
    assert not reads_pages(q, random_cache("bf16", 4, 2, 64, q.dtype, gen, bs=16)[0])
    assert not reads_pages(q, random_cache("bf16", 4, 2, 64, q.dtype, gen, False, 64)[0])
    assert reads_pages(q, random_cache("fp8_e4m3/per_head", 4, 2, 64, q.dtype, gen, bs=64)[0])
    assert not reads_pages(q, random_cache("int4", 4, 2, 64, q.dtype, gen, bs=64)[0])
    assert not reads_pages(q.half(), random_cache("bf16", 4, 2, 64, q.dtype, gen, bs=64)[0])


# fp8 only on CUDA: the interpreter rounds float8 subnormals differently from the hardware
STORE = _gpu_only(
    [("int4", 64), ("bf16", 128), ("fp16", 64)]
    + [(f, d) for f in FORMATS + ["fp8_e5m2/per_tensor"] for d in (64, 128)]
)


@pytest.mark.parametrize("fmt,dim", STORE)
def test_store_matches_reference_quantizer(request, fmt, dim):
    """Bit for bit what kv/quant.py writes, padding slots (-1) skipped and left untouched."""
    _skip_gpu_case(request)
    gen = torch.Generator().manual_seed(dim)
    heads, blocks, t = 4, 6, 37
    name, _, gran = fmt.partition("/")
    g = int(gran) if name == "int4" and gran else quant.INT4_GROUP_SIZE
    xs = [torch.randn(t, heads, dim, generator=gen) * 3, torch.randn(t, heads, dim, generator=gen)]
    xs[1] += 1.5  # groups of one sign
    xs[0][0, 0] = 0.25  # a constant group
    xs = [x.to(torch.bfloat16) for x in xs]
    slots = torch.randperm(blocks * BS, generator=gen)[:t]
    slots[5] = -1
    shape = (blocks, BS, heads, dim)

    if name in ("bf16", "fp16"):
        dt = torch.bfloat16 if name == "bf16" else torch.float16
        kv = PagedKV(paged_pool(*shape, dt, DEV), paged_pool(*shape, dt, DEV))
        refs = [(x.to(dt),) for x in xs]
    elif name.startswith("fp8"):
        dt = quant.kv_format(name).storage
        n = heads if gran == "per_head" else 1
        sc = [torch.rand(n, generator=gen) * 0.02 + 0.001 for _ in range(2)]
        sc = [s if n > 1 else s[0] for s in sc]
        kv = PagedKV(
            paged_pool(*shape, dt, DEV), paged_pool(*shape, dt, DEV), sc[0].to(DEV), sc[1].to(DEV)
        )
        refs = [(quant.quantize_fp8(x, s, dt),) for x, s in zip(xs, sc, strict=True)]
    else:
        packed, params = (*shape[:3], dim // 2), (*shape[:3], dim // g)
        p = [paged_pool(*params, torch.float16, DEV) for _ in range(4)]
        u8 = torch.uint8
        kv = PagedKV(paged_pool(*packed, u8, DEV), paged_pool(*packed, u8, DEV), *p, group_size=g)
        refs = [quant.quantize_int4(x, g) for x in xs]
    store_kv(xs[0].to(DEV), xs[1].to(DEV), slots.to(DEV), kv)
    keep = slots >= 0
    unwritten = torch.ones(blocks * BS, dtype=torch.bool)
    unwritten[slots[keep]] = False
    pools = [(kv.k, kv.k_scale, kv.k_zero), (kv.v, kv.v_scale, kv.v_zero)]
    for ref, pool in zip(refs, pools, strict=True):
        for r, got in zip(ref, pool, strict=False):
            flat = got.cpu().flatten(0, 1)
            assert torch.equal(flat[slots[keep]].view(torch.uint8), r[keep].view(torch.uint8))
            assert (flat[unwritten].view(torch.uint8) == 0).all()


def _small_model(path) -> str:  # noqa: ANN001
    """A 2-layer random Llama (GQA 4, head_dim 64), saved as an HF folder.

    Its logits stay near 1, where bf16 steps are 1/128: the near-tie tolerance below is several
    steps (larger logits make two tokens one bf16 step apart a frequent, meaningless flip).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _assert_same_greedy(ref, out, tol: float = 0.05) -> None:  # noqa: ANN001
    """Equal tokens, except that they may part at a near-tie of the reference's logprobs."""
    r, k = ref.outputs[0].token_ids, out.outputs[0].token_ids
    i = next((i for i, (a, b) in enumerate(zip(r, k, strict=True)) if a != b), None)
    if i is not None:
        lp = ref.outputs[0].logprobs[i]
        assert k[i] in lp and lp[r[i]].logprob - lp[k[i]].logprob < tol, (i, r, k)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,block_size,budget,tma",
    [
        ("auto", 16, 96, ()),
        ("fp8_e4m3", 16, 96, ()),
        ("int4", 16, 96, ()),
        ("auto", 16, 256, ("causal_prefill",)),  # whole prompts by TMA, split with paged_extend
        ("auto", 128, 256, ("causal_prefill", "paged_prefill")),  # and chunks, from the pages
        ("fp8_e4m3", 128, 256, ("paged_prefill",)),  # fp8 pages: whole prompts read them too
    ],
)
def test_engine_on_cuda_matches_reference(fmt, block_size, budget, tma, tmp_path, monkeypatch):
    """Chunked prefill, prefix hits and decode through the kernels, eager and graphed; with a
    budget of 256 tokens, steps mix sequences of 128+ queries (the TMA kernels') with others."""
    if not CUDA:
        pytest.skip("needs CUDA")
    from longserve import LLM, SamplingParams
    from longserve.ops import attention
    from longserve.ops.triton import warp_prefill

    calls = []

    def spying(name: str):  # noqa: ANN202
        fn = getattr(warp_prefill, name)

        def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return fn(*a, **kw)

        return spy

    for name in ("causal_prefill", "paged_prefill"):
        monkeypatch.setattr(warp_prefill, name, spying(name))

    path = _small_model(tmp_path / "m")
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 1024, (200,), generator=gen).tolist()
    prompts = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (1, 17, 300, 64)]
    prompts += [shared + [5, 6, 7], shared + [9]]  # the second hits the first's cached prefix
    prompts += [torch.randint(0, 1024, (700,), generator=gen).tolist()]
    prompts = [{"prompt_token_ids": p} for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=5)
    kw = dict(dtype="bfloat16", num_kv_blocks=8192 // block_size, kv_cache_dtype=fmt)
    kw.update(block_size=block_size, max_num_batched_tokens=budget)

    monkeypatch.setattr(attention, "use_kernels", False)
    ref_llm = LLM(model=path, **kw)
    assert not ref_llm.engine.runner.graphs  # the reference loop is never captured
    refs = ref_llm.generate(prompts, sp, use_tqdm=False)
    del ref_llm
    monkeypatch.setattr(attention, "use_kernels", True)
    for eager in (True, False):
        llm = LLM(model=path, enforce_eager=eager, **kw)
        assert bool(llm.engine.runner.graphs) != eager
        outs = llm.generate(prompts, sp, use_tqdm=False)
        for ref, out in zip(refs, outs, strict=True):
            _assert_same_greedy(ref, out)
    assert set(calls) == set(tma)

"""One layer's paged K and V as the kernels read them, in any KV format of kv/quant.py, and the
kernels' launch choices (plain Python: it imports without Triton).

Formats (the layout contract of kv/quant.py):
- PLAIN: bf16 / fp16 pools [blocks, block_size, kv_heads, head_dim].
- FP8: float8 e4m3 / e5m2 pools of that shape; static scales x = q * scale, one float32 per KV
  head (a per-tensor scale is the same number for every head, expanded with stride 0).
- INT4: uint8 pools [blocks, block_size, kv_heads, head_dim // 2], 16-bit word c holding channels
  c + j * head_dim / 4 in nibble j; float16 scale and zero pools [blocks, block_size, kv_heads,
  head_dim // group_size]; x = (q - zero) * scale. A quarter of the head must lie in one group
  or hold whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.kv.quant import check_int4_group

PLAIN, FP8, INT4 = 0, 1, 2
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@dataclass
class PagedKV:
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # fp8: [kv_heads] float32; int4: group scale pool
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None  # int4: group zero-point pool
    v_zero: torch.Tensor | None = None
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.k.stride(-1) != 1 or self.k.stride() != self.v.stride():
            raise ValueError("K and V pools need the same strides and a contiguous last dim")
        if self.fmt == FP8:
            heads = self.k.shape[2]
            self.k_scale = _per_head(self.k_scale, heads)
            self.v_scale = _per_head(self.v_scale, heads)
        if self.fmt == INT4:
            check_int4_group(self.head_dim, self.group_size)
            st = self.k_scale.stride()
            if (
                st != self.k_zero.stride()
                or st[-1] != 1
                or any(x % self.k_scale.shape[-1] for x in st[:-1])
            ):
                raise ValueError("int4 scale and zero pools need the same, whole-group strides")
        if self.fmt != PLAIN and any(x % 4 for x in self.k.stride()[:-1]):
            raise ValueError("quantized pools need rows that start on 4-byte words")

    @property
    def fmt(self) -> int:
        if self.k.dtype == torch.uint8:
            return INT4
        return FP8 if self.k.dtype in FP8_MAX else PLAIN

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (2 if self.fmt == INT4 else 1)

    def kernel_args(self) -> tuple:
        """Pointers and strides shared by every kernel: K, V, K/V scales, K/V zeros, strides."""
        k, v = self.k, self.v
        if self.fmt == INT4:
            ks, vs, kz, vz = self.k_scale, self.v_scale, self.k_zero, self.v_zero
            ps = ks.stride()[:3]
            sh = 0
        elif self.fmt == FP8:
            ks, vs, kz, vz = self.k_scale, self.v_scale, self.k_scale, self.v_scale
            ps, sh = (0, 0, 0), ks.stride(0)
        else:
            ks = vs = kz = vz = k
            ps, sh = (0, 0, 0), 0
        return (k, v, ks, vs, kz, vz, *k.stride()[:3], *ps, sh)


def decode_config(fmt: int) -> dict:
    """Keys per tile, warps, pipeline stages and programs an SM (num_splits' waves: 4, the most
    that stay resident) of decode.py's kernel, the best of the H200 sweeps and A/Bs
    (docs/kernels.md): 64 keys for bf16/fp16 and 128 for fp8 with 4 warps; 128 for int4 with 2
    (at every point of its sweep; 4 warps took 1.18-1.22x the time). On Hopper most caches take
    warp_decode.py's kernel and warp_decode_config. The block-table load
    takes a pipeline stage of its own, so 3 or 4 stages leave a single K/V buffer and 5 give two:
    int4 gained about 5% from the second, bf16 nothing, and fp8 lost at batch 32 (its larger
    buffers keep only three programs on an SM)."""
    return {
        PLAIN: dict(block_n=64, num_warps=4, num_stages=3, waves=4),
        FP8: dict(block_n=128, num_warps=4, num_stages=3, waves=4),
        INT4: dict(block_n=128, num_warps=2, num_stages=5, waves=4),
    }[fmt]


def warp_decode_config(fmt: int, groups: int = 1) -> dict:
    """warp_decode.py's launch (one warp a program) for a format, int4 with `groups` scale groups
    a head, the best of the H200 A/Bs (docs/kernels.md): bf16/fp16 tiles of 32 keys in 2 ring
    slots and fp8 of 32 in 3, four programs an SM; int4 tiles of 128 / groups keys (at 64 with 4
    groups a program needs 255 registers and spills) in 3 slots, eight programs an SM."""
    if fmt == INT4:
        return dict(block_n=128 // groups, num_warps=1, num_stages=3, waves=8)
    return dict(block_n=32, num_warps=1, num_stages=2 if fmt == PLAIN else 3, waves=4)


def warp_decode_serves(
    fmt: int, head_dim: int, group_size: int, block_size: int, group: int
) -> bool:
    """Whether decode on Hopper takes warp_decode.py's kernel: heads of 64 or 128 channels, up to
    16 query heads a KV head (the mma's N), int4 in 2 or 4 scale groups a head, pages of a power
    of two tokens (tiles and pages nest). The rest take decode.py's kernel."""
    return (
        head_dim in (64, 128)
        and group <= 16
        and (fmt != INT4 or head_dim // group_size in (2, 4))
        and block_size & (block_size - 1) == 0
    )


def extend_config(dim: int, group: int) -> dict:
    """Tiles of 64 rows (tokens x group) by 64 keys, 4 warps, 3 stages: the best of the H200
    sweep for Llama-3.3-70B's shape (docs/kernels.md), ahead of 128-row tiles."""
    return dict(BM=64, TM=max(1, 64 // group), BN=64, num_warps=4, num_stages=3)


MIN_TMA_PAGE = 64  # tokens a page holds for paged_prefill: at 32 it ran no faster than paged extend


def prefill_config() -> dict:
    """The warp-specialized prefill's tiles: 128 queries of one head a CTA (64 a consumer
    warpgroup) by 128 keys, 3 ring slots (bf16/fp16; fp8 keeps 2, warp_prefill.FP8_STAGES). On
    the H200 (docs/kernels.md), 3 slots against 2: 673 / 622 TFLOP/s against 657 / 616 at 16K /
    128K."""
    return dict(BM=128, BN=128, num_stages=3)


def _per_head(scale: torch.Tensor | None, heads: int) -> torch.Tensor:
    if scale is None:
        raise ValueError("fp8 KV needs k and v scales")
    scale = scale.to(torch.float32).reshape(-1)
    return scale.expand(heads) if scale.numel() == 1 else scale


def paged_kv(cache, layer: int) -> PagedKV:  # noqa: ANN001 (a KVCache; no import cycle)
    """The kernels' view of one layer of a KVCache, built on first use: the pools and scales are
    fixed once the cache exists, and every step of every layer asks for it."""
    view = cache.kernel_views.get(layer)
    if view is None:
        view = cache.kernel_views[layer] = _view(cache, layer)
    return view


def _view(cache, layer: int) -> PagedKV:  # noqa: ANN001
    """Its pools' dtype says the format."""
    k, v = cache.k[layer], cache.v[layer]
    if k.dtype == torch.uint8:
        ks, vs = cache.k_group_scale[layer], cache.v_group_scale[layer]
        kz, vz = cache.k_group_zero[layer], cache.v_group_zero[layer]
        return PagedKV(k, v, ks, vs, kz, vz, cache.group_size)
    if k.dtype in FP8_MAX:
        return PagedKV(k, v, cache.scales[layer, 0], cache.scales[layer, 1])
    return PagedKV(k, v)

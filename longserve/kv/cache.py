"""Paged KV storage for all layers: one [num_blocks, block_size, kv_heads, ...] pool per layer,
laid out head by head within a block (paged_pool).

A token's slot is block_id * block_size + offset. Keys arrive already rotated (cached after RoPE).
The storage format (kv/quant.py has the layouts) is applied on write and undone on gather, so the
attention reference reads the same values a kernel reading the quantized cache would.
"""

from __future__ import annotations

import hashlib

import torch

from longserve.kv.quant import (
    INT4_GROUP_SIZE,
    check_int4_group,
    dequantize_fp8,
    dequantize_int4,
    kv_format,
    quantize_fp8,
    quantize_int4,
)


def paged_pool(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A zeroed pool indexed [blocks, block_size, kv_heads, width] whose memory holds a block head
    by head ([blocks, kv_heads, block_size, width]): a decode program reads one KV head, whose
    rows of a block then lie together instead of one row per token (what it gained on the H200:
    docs/kernels.md). The kernels take any strides."""
    shape = (num_blocks, num_kv_heads, block_size, width)
    return torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
        scales: torch.Tensor | None = None,
        group_size: int = INT4_GROUP_SIZE,
    ) -> None:
        """dtype is the model's; scales (fp8 only) are x = q * scale, [layers, 2(, kv_heads)]."""
        self.fmt = kv_format(kv_cache_dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.group_size = num_kv_heads, head_dim, group_size
        self.dtype = self.fmt.storage or dtype
        if self.fmt.static_scales:
            want = ((num_layers, 2), (num_layers, 2, num_kv_heads))
            if scales is None or tuple(scales.shape) not in want:
                got = None if scales is None else tuple(scales.shape)
                raise ValueError(f"{self.fmt.name} needs scales of shape {want}, got {got}")
            if not torch.isfinite(scales).all() or (scales <= 0).any():
                raise ValueError(f"{self.fmt.name} scales must be finite and positive")
            self.scales = scales.float().to(device)
        elif scales is not None:
            raise ValueError(f"{self.fmt.name} takes no static scales")
        else:
            self.scales = None
        width = head_dim
        if self.fmt.group_scales:
            check_int4_group(head_dim, group_size)  # at start, not at the kernels' first step
            width = head_dim // 2
        shape, half = (num_blocks, block_size, num_kv_heads, width), torch.float16

        def pool(shape: tuple[int, ...], dt: torch.dtype) -> list[torch.Tensor]:
            return [paged_pool(*shape, dt, device) for _ in range(num_layers)]

        self.k, self.v = pool(shape, self.dtype), pool(shape, self.dtype)
        self.storage = [self.k, self.v]
        self.groups: tuple[tuple[list[torch.Tensor], list[torch.Tensor]], ...] = ()
        if self.fmt.group_scales:
            gshape = (*shape[:3], head_dim // group_size)
            self.k_group_scale, self.k_group_zero = pool(gshape, half), pool(gshape, half)
            self.v_group_scale, self.v_group_zero = pool(gshape, half), pool(gshape, half)
            self.groups = (
                (self.k_group_scale, self.k_group_zero),
                (self.v_group_scale, self.v_group_zero),
            )
            self.storage += [self.k_group_scale, self.k_group_zero]
            self.storage += [self.v_group_scale, self.v_group_zero]
        self.kernel_views: dict[int, object] = {}  # per layer, the CUDA kernels' view (ops/triton)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in all layers, keys and values, group scales included."""
        slots = self.num_blocks * self.block_size
        return sum(t.numel() * t.element_size() // slots for ts in self.storage for t in ts)

    @property
    def cache_key(self) -> bytes:
        """What a cached block's bytes depend on besides its tokens: format, dtype, scales."""
        key = f"{self.fmt.name}:{self.dtype}:g{self.group_size if self.fmt.group_scales else 0}"
        if self.scales is not None:
            digest = hashlib.sha256(self.scales.cpu().numpy().tobytes()).hexdigest()[:16]
            key += f":{tuple(self.scales.shape)}:{digest}"
        return key.encode()

    def _put(
        self, pools: list[torch.Tensor], layer: int, x: torch.Tensor, slots: torch.Tensor
    ) -> None:
        dst = pools[layer]
        if x.dtype.itemsize == 1:  # index_put_ has no float8 kernel on the CPU: copy bytes
            dst, x = dst.view(torch.uint8), x.view(torch.uint8)
        dst[slots // self.block_size, slots % self.block_size] = x

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat slots [T], quantized to the cache format."""
        if k.is_cuda:  # the Triton store kernel writes the same bytes; slots < 0 are skipped
            from longserve.ops import triton as kernels

            kernels.store_kv(k, v, slots, kernels.paged_kv(self, layer))
            return
        for i, (x, pools) in enumerate(((k, self.k), (v, self.v))):
            if self.groups:
                q, scale, zero = quantize_int4(x, self.group_size)
                self._put(self.groups[i][0], layer, scale, slots)
                self._put(self.groups[i][1], layer, zero, slots)
            elif self.scales is not None:
                q = quantize_fp8(x, self.scales[layer, i], self.dtype)
            elif self.dtype == torch.float16 and x.dtype != torch.float16:
                q = x.clamp(-65504.0, 65504.0).to(self.dtype)
            else:
                q = x.to(self.dtype)
            self._put(pools, layer, q, slots)

    def gather(
        self, layer: int, block_ids: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached tokens of a sequence, [length, kv_heads, head_dim] in dtype."""

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, block_ids).flatten(0, 1)[:length]

        out = []
        for i, pools in enumerate((self.k, self.v)):
            q = take(pools[layer])
            if self.groups:
                scale, zero = (take(t[layer]) for t in self.groups[i])
                out.append(dequantize_int4(q, scale, zero, dtype))
            elif self.scales is not None:
                out.append(dequantize_fp8(q, self.scales[layer, i], dtype))
            else:
                out.append(q.to(dtype))
        return out[0], out[1]

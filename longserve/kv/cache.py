"""Paged KV storage for all layers: one [num_blocks, block_size, kv_heads, head_dim] pool per layer.

A token's slot is block_id * block_size + offset. Keys arrive already rotated (cached after RoPE).
"""

from __future__ import annotations

import torch


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
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in all layers, keys and values."""
        return 2 * len(self.k) * self.num_kv_heads * self.head_dim * self.k[0].element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat slots [T]."""
        if k.is_cuda:  # the Triton store kernel writes the same bytes; slots < 0 are skipped
            from longserve.ops import triton as kernels

            kernels.store_kv(k, v, slots, kernels.paged_kv(self, layer))
            return
        self.k[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, slots, k.to(self.dtype)
        )
        self.v[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, slots, v.to(self.dtype)
        )

    def gather(
        self, layer: int, block_ids: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached tokens of a sequence, [length, kv_heads, head_dim] in dtype."""
        k = self.k[layer][block_ids].flatten(0, 1)[:length]
        v = self.v[layer][block_ids].flatten(0, 1)[:length]
        return k.to(dtype), v.to(dtype)

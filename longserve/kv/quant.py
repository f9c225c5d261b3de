"""KV cache formats: what a token costs in each, the one place the engine and the planner read.

Layouts (the contract between the torch reference and the Triton kernels):
- auto / bf16 / fp16: the dtype itself, [blocks, block_size, kv_heads, head_dim].
- fp8_e4m3 / fp8_e5m2: torch float8 of the same shape; static scales with x = q * scale, shape
  [layers, 2] (per_tensor) or [layers, 2, kv_heads] (per_head), float32. Static scales add no
  bytes per token.
- int4: two values a byte along head_dim, [blocks, block_size, kv_heads, head_dim // 2] uint8,
  low nibble first, asymmetric per token, per head and per group of `group_size` channels:
  x = (q - zero) * scale with scale and zero stored as float16 each,
  [blocks, block_size, kv_heads, head_dim // group_size] apiece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int
    storage: torch.dtype | None  # None: the model's dtype
    group_scales: bool = False  # per-token group scale and zero point (int4)


KV_FORMATS = {
    "auto": KVFormat("auto", 16, None),
    "bf16": KVFormat("bf16", 16, torch.bfloat16),
    "fp16": KVFormat("fp16", 16, torch.float16),
    "fp8_e4m3": KVFormat("fp8_e4m3", 8, torch.float8_e4m3fn),
    "fp8_e5m2": KVFormat("fp8_e5m2", 8, torch.float8_e5m2),
    "int4": KVFormat("int4", 4, torch.uint8, group_scales=True),
}
KV_FORMATS["fp8"] = KV_FORMATS["fp8_e4m3"]
INT4_GROUP_SIZE = 64
GROUP_PARAM_BYTES = 4  # a float16 scale and a float16 zero point per group


def kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise ValueError(f"unknown kv cache dtype {name!r}: use {', '.join(KV_FORMATS)}")
    return KV_FORMATS[name]


def kv_bytes_per_token(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    kv_dtype: str,
    model_dtype_bytes: int = 2,
    group_size: int = INT4_GROUP_SIZE,
) -> int:
    """Bytes one token's keys and values take in all layers, group scales included."""
    fmt = kv_format(kv_dtype)
    bits = 8 * model_dtype_bytes if fmt.storage is None else fmt.bits
    per_head = head_dim * bits // 8
    if fmt.group_scales:
        per_head += (head_dim // group_size) * GROUP_PARAM_BYTES
    return 2 * num_layers * num_kv_heads * per_head

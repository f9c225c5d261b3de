"""KV cache formats: what a token costs in each, and the reference quantize / dequantize.

This is the one place the engine and the planner read, and the contract between the torch
reference (KVCache.write / gather) and the Triton kernels. Every pool below is indexed [blocks,
block_size, kv_heads, ...] and laid out head by head within a block (kv/cache.py, paged_pool: the
tensor is a transposed view of [blocks, kv_heads, block_size, ...]); the kernels take the
strides, so any layout reads right. KVCache holds, per layer:
- auto / bf16 / fp16: `k[layer]`, `v[layer]` in the dtype itself, [blocks, block_size, kv_heads,
  head_dim]. fp16 saturates at its max (65504) on write instead of overflowing to inf.
- fp8_e4m3 / fp8_e5m2: `k[layer]`, `v[layer]` in torch float8 of the same shape, and static scales
  `scales`, float32, with x = q * scale: shape [layers, 2] (per_tensor) or [layers, 2, kv_heads]
  (per_head), index 0 for keys and 1 for values. Writes compute q = clamp(x / scale, -max, max)
  (max 448 for e4m3, 57344 for e5m2) and cast with round-to-nearest; nothing becomes inf or NaN.
  Static scales add no bytes per token.
- int4: `k[layer]`, `v[layer]` as uint8 [blocks, block_size, kv_heads, head_dim // 2], two values
  a byte, in quarters: with Q = head_dim // 4, the 16-bit word c (bytes 2c, 2c + 1) holds channels
  c, c + Q, c + 2Q, c + 3Q in nibbles 0..3 (low nibble first). Kernels read the words and split
  them into four tiles that are each a contiguous quarter of the head, so that a quarter lies in
  one scale group (or holds whole groups) and its dot product takes one group scale per key;
  asymmetric per token, per head and per group of `group_size` channels: x = (q - zero) * scale,
  q in 0..15, with scale and zero float16 each in `k_group_scale[layer]`, `k_group_zero[layer]`
  (and v_...), [blocks, block_size, kv_heads, head_dim // group_size] apiece. A group's scale is
  (max - min) / 15, but at least max(|min|, |max|) / 1024 and float16's smallest normal: a group
  narrow for its magnitude would otherwise get a zero past float16's range (inf on read).
  zero = -min / scale; both are rounded to float16 first, then q = floor(x / scale + zero + 0.5)
  clamped to 0..15, so dequantizing with the stored pair gives the nearest level.
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

    @property
    def static_scales(self) -> bool:
        """fp8 formats need calibrated scales; the others need none."""
        return self.storage in (torch.float8_e4m3fn, torch.float8_e5m2)


KV_FORMATS = {
    "auto": KVFormat("auto", 16, None),
    "bf16": KVFormat("bf16", 16, torch.bfloat16),
    "fp16": KVFormat("fp16", 16, torch.float16),
    "fp8_e4m3": KVFormat("fp8_e4m3", 8, torch.float8_e4m3fn),
    "fp8_e5m2": KVFormat("fp8_e5m2", 8, torch.float8_e5m2),
    "int4": KVFormat("int4", 4, torch.uint8, group_scales=True),
}
KV_FORMATS["fp8"] = KV_FORMATS["fp8_e4m3"]
KV_SCALES = ("per_tensor", "per_head")
INT4_GROUP_SIZE = 64
GROUP_PARAM_BYTES = 4  # a float16 scale and a float16 zero point per group


def check_int4_group(head_dim: int, group_size: int) -> None:
    """Refuse int4 groups the layout above cannot hold: a multiple of 4 channels dividing head_dim,
    such that a quarter of the head lies in one group or holds whole ones."""
    quarter = head_dim // 4
    if (
        group_size < 4
        or group_size % 4
        or head_dim % group_size
        or (group_size % quarter and quarter % group_size)
    ):
        raise ValueError(
            f"int4 group size {group_size} must be a multiple of 4 dividing head_dim {head_dim}, "
            f"and a quarter of the head ({quarter} channels) must lie in one group or hold "
            f"whole groups"
        )


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


def fp8_scales(kv_range: torch.Tensor, fmt: KVFormat, granularity: str) -> torch.Tensor:
    """Scales x = q * scale from the magnitude each (layer, K/V, head) must reach, [layers, 2, H].

    per_head keeps [layers, 2, kv_heads]; per_tensor takes the largest head: [layers, 2].
    """
    if granularity not in KV_SCALES:
        raise ValueError(f"unknown kv scale {granularity!r}: use {', '.join(KV_SCALES)}")
    r = kv_range.float() if granularity == "per_head" else kv_range.float().amax(-1)
    return r.clamp_min(torch.finfo(torch.float32).tiny) / torch.finfo(fmt.storage).max


def _head_scale(scale: torch.Tensor) -> torch.Tensor:
    """A [kv_heads] or scalar scale, shaped to broadcast over [T, kv_heads, head_dim]."""
    return scale.view(-1, 1) if scale.dim() else scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, kv_heads, head_dim] -> float8 q with x ~ q * scale; saturates at the format's max."""
    m = torch.finfo(dtype).max
    return (x.float() / _head_scale(scale)).clamp(-m, m).to(dtype)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * _head_scale(scale)).to(dtype)


def quantize_int4(
    x: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (packed uint8 [T, H, D // 2], scale and zero float16 [T, H, D // group])."""
    t, h, d = x.shape
    g = x.float().reshape(t, h, d // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    f16 = torch.finfo(torch.float16)
    floor = torch.maximum(lo.abs(), hi.abs()) / 1024
    scale = torch.maximum((hi - lo) / 15, floor).clamp(f16.tiny, f16.max).half()
    zero = (-lo / scale.float()).clamp(-f16.max, f16.max).half()
    q = torch.floor(g / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1) + 0.5)
    q = q.clamp(0, 15).to(torch.uint8).reshape(t, h, 4, d // 4).transpose(-1, -2)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(t, h, d // 2), scale, zero


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Packed uint8 [T, H, D // 2] with float16 scale, zero [T, H, G] -> x [T, H, D] in dtype."""
    t, h, half = packed.shape
    pairs = packed.reshape(t, h, half // 2, 2)  # [word c, byte]
    q = torch.stack((pairs & 15, pairs >> 4), dim=-1).reshape(t, h, half // 2, 4)
    q = q.transpose(-1, -2).reshape(t, h, scale.shape[-1], -1)  # quarters back in channel order
    x = (q.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return x.reshape(t, h, -1).to(dtype)

"""Weight formats: bytes per weight of each, the one place the engine and the planner read.

bf16: 2 bytes. fp8: e4m3 with one float32 scale per output channel. int4: asymmetric, group of
128 input channels sharing a float16 scale and a float16 zero point (AWQ-style).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int
    group_size: int = 0  # input channels sharing a scale and zero (0: per output channel)
    channel_scale_bytes: int = 0  # bytes of scale per output channel


WEIGHT_FORMATS = {
    "bf16": WeightFormat("bf16", 16),
    "fp16": WeightFormat("fp16", 16),
    "fp8": WeightFormat("fp8", 8, channel_scale_bytes=4),
    "int4": WeightFormat("int4", 4, group_size=128),
}


def weight_format(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r}: use {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[name]


def linear_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes a linear layer's weight takes in this format, scales and zero points included."""
    f = weight_format(fmt)
    n = out_features * in_features * f.bits // 8 + out_features * f.channel_scale_bytes
    if f.group_size:
        n += out_features * (in_features // f.group_size) * 4
    return n

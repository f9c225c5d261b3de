"""Weight formats: bytes per weight of each, the one place the engine and the planner read.

bf16/fp16: 2 bytes. fp8: e4m3 with one float32 scale per output channel. int4: asymmetric, a group
of 128 input channels sharing a float16 scale and a float16 zero point (AWQ-style); a layer whose
input width is not a multiple of 128 stores its last group padded to 128.
The layers of longserve.ops.quant_linear hold exactly linear_bytes() (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int
    group_size: int = 0  # input channels sharing a scale and zero (0: per output channel)
    channel_scale_bytes: int = 0  # bytes of scale per output channel
    group_bytes: int = 0  # bytes of scale and zero point per group and output channel


WEIGHT_FORMATS = {
    "bf16": WeightFormat("bf16", 16),
    "fp16": WeightFormat("fp16", 16),
    "fp8": WeightFormat("fp8", 8, channel_scale_bytes=4),
    "int4": WeightFormat("int4", 4, group_size=128, group_bytes=4),
}


def weight_format(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r}: use {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[name]


def linear_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes a linear layer's weight takes in this format, scales and zero points included."""
    f = weight_format(fmt)
    if f.group_size:
        groups = -(-in_features // f.group_size)
        in_features = groups * f.group_size
        return out_features * (in_features * f.bits // 8 + groups * f.group_bytes)
    return out_features * (in_features * f.bits // 8 + f.channel_scale_bytes)

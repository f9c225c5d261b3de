"""Rotary position embedding: inverse frequencies and attention factor for default, llama3, yarn.

Computed the way HF transformers computes them, in float32, so that logits match bit for bit
in float32; keys are rotated before they enter the KV cache.
"""

from __future__ import annotations

import math

import torch

from longserve.config import ModelConfig


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(cfg: ModelConfig, rs: dict) -> torch.Tensor:
    """Meta's llama3 scaling: long wavelengths divided by factor, short kept, a smooth band between."""
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.head_dim)
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, rs["factor"]
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attn)


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention factor applied to cos and sin)."""
    rs = cfg.rope_scaling
    kind = rs["rope_type"] if rs else "default"
    if kind == "default":
        return _default_inv_freq(cfg.rope_theta, cfg.head_dim), 1.0
    if kind == "llama3":
        return _llama3(cfg, rs), 1.0
    if kind == "yarn":
        return _yarn(cfg, rs)
    raise ValueError(f"unsupported rope_type {kind!r}")


class Rotary(torch.nn.Module):
    """cos/sin table over every position up to max_len, applied with HF's rotate-half convention."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_parameters(cfg)
        pos = torch.arange(max_len, dtype=torch.float32)
        emb = torch.outer(pos, inv_freq).repeat(1, 2)
        self.cos = (emb.cos() * self.attention_factor).to(device)
        self.sin = (emb.sin() * self.attention_factor).to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated q, k in their own dtype."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

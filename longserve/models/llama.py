"""The dense decoder for Llama and Qwen2 (q/k/v bias, tied or untied lm_head), HF weight names.

It takes a flat batch of tokens from many sequences (prefill chunks and decodes together) with
their positions; attention reads and writes the paged KV cache through AttnMeta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longserve.config import ModelConfig
from longserve.kv.cache import KVCache
from longserve.models.rope import Rotary
from longserve.ops.attention import AttnMeta, attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.hq, self.hkv, self.d = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.hq * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, h, bias=False)
        self.scale = self.d**-0.5

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, kv: KVCache, meta: AttnMeta
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.hq, self.d)
        k = self.k_proj(x).view(t, self.hkv, self.d)
        v = self.v_proj(x).view(t, self.hkv, self.d)
        q, k = rotary(positions, q, k)
        kv.write(self.layer, k, v, meta.slot_mapping)
        o = attention(q, kv, self.layer, meta, self.scale, k, v)
        return self.o_proj(o.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, rotary, kv, meta):  # noqa: ANN001, ANN201 (hot path)
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """HF-compatible names: model.embed_tokens, model.layers.N..., model.norm, lm_head."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = rotary

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttnMeta
    ) -> torch.Tensor:
        """Flat tokens [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, self.rotary, kv, meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

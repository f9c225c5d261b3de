"""Model and engine configuration: the facts of a model and the knobs of the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from longserve.kv.quant import KV_SCALES, kv_format


def normalize_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Return a copy of a config's rope_scaling with "rope_type" set, whether it said "type" or not."""
    if not rope_scaling:
        return None
    out = dict(rope_scaling)
    kind = out.pop("type", None)
    out.setdefault("rope_type", kind or "default")
    if out["rope_type"] not in ("default", "llama3", "yarn"):
        raise ValueError(f"unsupported rope_type {out['rope_type']!r}: use default, llama3 or yarn")
    return None if out["rope_type"] == "default" else out


@dataclass
class ModelConfig:
    """The shape of a dense decoder (Llama, Qwen2), as read from config.json or GGUF metadata."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    name: str = ""

    @property
    def window(self) -> int:
        """Longest context the model is meant for: YaRN extends its original window by its factor."""
        rs = self.rope_scaling
        if rs and rs["rope_type"] == "yarn":
            orig = rs.get("original_max_position_embeddings", self.max_position_embeddings)
            return int(orig * rs["factor"])
        return self.max_position_embeddings

    @property
    def kv_bytes_per_token_fp16(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and lm_head included)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "") -> ModelConfig:
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported model_type {arch!r}: longserve runs llama and qwen2")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_scaling=normalize_rope_scaling(rope),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            eos_token_ids=[] if eos is None else (eos if isinstance(eos, list) else [eos]),
            bos_token_id=d.get("bos_token_id"),
            name=name,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        return cls.from_hf(json.loads(path.read_text()), name=path.stem)

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers reads back to the same model."""
        d = {
            "architectures": ["Qwen2ForCausalLM" if self.arch == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "eos_token_id": self.eos_token_ids,
            "bos_token_id": self.bos_token_id,
        }
        if self.arch == "llama":
            d["attention_bias"] = self.qkv_bias
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d


@dataclass
class EngineConfig:
    """Engine knobs; names follow vLLM's engine arguments where one exists."""

    model: str = "smollm2-135m"
    dtype: str = "auto"
    weights: str = "auto"  # decoder linears: auto (as loaded), bf16, fp16, fp8, int4
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    max_num_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    kv_scale: str = "per_head"
    kv_int4_group_size: int = 64
    kv_calibration_text: str | None = None
    synthetic_weights: bool = False
    num_layers: int | None = None
    rope_scaling: dict | None = None
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        kv_format(self.kv_cache_dtype)
        if self.kv_scale not in KV_SCALES:
            raise ValueError(f"kv_scale must be per_tensor or per_head, got {self.kv_scale!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """auto: bfloat16 on CUDA, float32 on the CPU (exact; pass bfloat16 for AMX speed)."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if self.dtype not in names:
            raise ValueError(
                f"unknown dtype {self.dtype!r}: use auto, float32, bfloat16 or float16"
            )
        return names[self.dtype]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

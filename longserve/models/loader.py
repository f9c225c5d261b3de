"""Weights: GGUF files (dequantized with the gguf package), safetensors folders, synthetic weights.

A safetensors folder whose config.json has a quantization_config (AWQ int4, compressed-tensors
fp8) has its linear tensors converted to the layouts of longserve.ops.quant_linear.

Everything is returned under HF parameter names so one decoder serves all sources.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from longserve.config import ModelConfig
from longserve.ops.quant_linear import from_checkpoint

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):  # noqa: ANN001, ANN202
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, name: str) -> ModelConfig:  # noqa: ANN001
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: longserve runs llama and qwen2")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_layers=_field(reader, f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=_field(reader, f"{arch}.rope.dimension_count", hidden // heads),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=_field(reader, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        eos_token_ids=[_field(reader, "tokenizer.ggml.eos_token_id")],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        name=name,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary layout; restore HF's half-split rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights; the dequantized weights are cached as safetensors (seconds)."""
    import gguf
    from safetensors.torch import load_file, save_file

    from longserve.tokenizer import cache_dir

    folder = cache_dir(path, "weights")
    cached, cached_cfg = folder / "model.safetensors", folder / "config.json"
    if cached.exists() and cached_cfg.exists():
        cfg = ModelConfig.from_hf(json.loads(cached_cfg.read_text()), name=name)
        return cfg, load_file(str(cached))
    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader, name)
    weights = {}
    for t in reader.tensors:
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", t.name)
        if m is None or m.group(2) not in _GGUF_NAMES:
            raise ValueError(f"unexpected GGUF tensor {t.name}")
        layer, base, kind = m.groups()
        shape = tuple(int(x) for x in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if cfg.arch == "llama" and base in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.num_heads if base == "attn_q" else cfg.num_kv_heads)
        hf = _GGUF_NAMES[base]
        key = f"{hf}.{kind}" if layer is None else f"model.layers.{layer}.{hf}.{kind}"
        weights[key] = torch.from_numpy(np.ascontiguousarray(w))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    save_file(weights, str(tmp))
    tmp.rename(cached)
    cached_cfg.write_text(json.dumps(cfg.to_hf()))
    return cfg, weights


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    return from_checkpoint(weights, qc) if qc else weights


def hf_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), name=folder.name)


@torch.no_grad()
def fill_synthetic(model: torch.nn.Module, seed: int) -> None:
    """Random weights of the real shape (std 0.02, norms at 1): for speed work, not for text."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)

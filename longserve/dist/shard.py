"""The sharding pass: one rank's slice of the decoder, built before any weight is loaded.

Megatron's split, on the decoder's own nn.Linear modules (a later pass may swap them for
quantized ones; shard first, then quantize):
  q/k/v_proj, gate/up_proj   column-parallel: this rank's output rows (its heads, its slice of
                             the MLP), no communication
  o_proj, down_proj          row-parallel: the matching input columns; each rank holds a partial
                             sum, so the attention block and the MLP block each end in one
                             all-reduce (a forward hook on the block)
  embed_tokens, lm_head      vocab-parallel: rows [start, start + V/tp), V padded with zero rows
                             to a multiple of tp; the embedding all-reduces its rows, the logits
                             are gathered by the driver (longserve.dist.worker)
KV heads split with the query heads; where there are fewer KV heads than ranks each KV head is
replicated on the ranks whose query heads read it. Norms are replicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longserve.config import ModelConfig
from longserve.models.llama import CausalLM

if TYPE_CHECKING:
    from longserve.dist.group import TPGroup


@dataclass(frozen=True)
class Split:
    """This rank's part of one parameter: [start, end) of the full size along dim, then pad rows."""

    dim: int  # 0: output rows, 1: input columns
    start: int
    end: int
    full: int
    pad: int = 0


def head_ranges(cfg: ModelConfig, rank: int, size: int) -> tuple[range, range]:
    """The query heads and KV heads one rank holds.

    With at least as many KV heads as ranks, each rank takes a balanced share of the KV heads
    with their query groups (uneven where they do not divide: 3 KV heads over 2 ranks give 1 and
    2); with fewer, the query heads split evenly and each rank keeps the one KV head they read.
    """
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    if hkv >= size:
        kv = range(rank * hkv // size, (rank + 1) * hkv // size)
        g = hq // hkv
        return range(kv.start * g, kv.stop * g), kv
    if size % hkv or hq % size:
        raise ValueError(
            f"tensor_parallel_size {size} is more than the {hkv} KV heads: it must then be a"
            f" multiple of them and divide the {hq} query heads"
        )
    q = hq // size
    kv0 = rank * hkv // size
    return range(rank * q, rank * q + q), range(kv0, kv0 + 1)


def local_config(cfg: ModelConfig, tp: TPGroup | None) -> ModelConfig:
    """The attention shape of this rank (its query and KV heads): what its KV cache holds."""
    if tp is None:
        return cfg
    q, kv = head_ranges(cfg, tp.rank, tp.size)
    return replace(cfg, num_heads=len(q), num_kv_heads=len(kv))


class ShardPlan:
    """Which slice of each parameter a rank holds, by HF parameter name."""

    def __init__(self, cfg: ModelConfig, rank: int, size: int) -> None:
        self.cfg, self.rank, self.size = cfg, rank, size
        self.q_heads, self.kv_heads = head_ranges(cfg, rank, size)
        d, i = cfg.head_dim, cfg.intermediate_size
        self.vocab_rows = -(-cfg.vocab_size // size)
        v0 = min(rank * self.vocab_rows, cfg.vocab_size)
        v1 = min(v0 + self.vocab_rows, cfg.vocab_size)
        self.vocab = Split(0, v0, v1, cfg.vocab_size, self.vocab_rows - (v1 - v0))
        q = Split(0, self.q_heads.start * d, self.q_heads.stop * d, cfg.num_heads * d)
        kv = Split(0, self.kv_heads.start * d, self.kv_heads.stop * d, cfg.num_kv_heads * d)
        mlp = Split(0, rank * i // size, (rank + 1) * i // size, i)
        self.splits = {"model.embed_tokens.weight": self.vocab, "lm_head.weight": self.vocab}
        for n in range(cfg.num_layers):
            p = f"model.layers.{n}."
            for b in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                self.splits[p + f"self_attn.q_proj.{b}"] = q
                self.splits[p + f"self_attn.k_proj.{b}"] = kv
                self.splits[p + f"self_attn.v_proj.{b}"] = kv
            self.splits[p + "self_attn.o_proj.weight"] = replace(q, dim=1)
            self.splits[p + "mlp.gate_proj.weight"] = mlp
            self.splits[p + "mlp.up_proj.weight"] = mlp
            self.splits[p + "mlp.down_proj.weight"] = replace(mlp, dim=1)

    def take(self, name: str, full: Any) -> torch.Tensor:
        """This rank's slice of a full tensor, or of a lazy safetensors slice (reads only it)."""
        s = self.splits.get(name)
        if s is None:
            return full[:]
        x = full[s.start : s.end] if s.dim == 0 else full[:, s.start : s.end]
        return F.pad(x, (0, 0, 0, s.pad)) if s.pad else x

    def full_shape(self, name: str, shape: torch.Size) -> tuple[int, ...]:
        """The unsharded shape of a parameter whose shard has this shape."""
        s = self.splits.get(name)
        if s is None:
            return tuple(shape)
        out = list(shape)
        out[s.dim] = s.full
        return tuple(out)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [start, end) of the vocabulary: other ids give zeros, summed across ranks."""

    def __init__(self, weight: torch.Tensor, start: int, end: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.end = start, end

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        x = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(x)
        return x


def _all_reduce_output(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """Sum a row-parallel block's partial outputs: the block's one all-reduce."""
    dist.all_reduce(out)
    return out


def shard_model(model: CausalLM, plan: ShardPlan) -> None:
    """Rewrite the decoder in place to this rank's slice.

    On a model built on the meta device this only changes shapes, so the rank then allocates its
    slice alone; on a loaded model it keeps a copy of the slice and drops the rest.
    """
    for name in plan.splits:
        owner, attr = name.rsplit(".", 1)
        mod = model.get_submodule(owner)
        w = plan.take(name, getattr(mod, attr)).clone()
        setattr(mod, attr, nn.Parameter(w))
        if isinstance(mod, nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = w.shape
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.hq, attn.hkv = len(plan.q_heads), len(plan.kv_heads)
        attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)
    v = plan.vocab
    model.model.embed_tokens = VocabParallelEmbedding(
        model.model.embed_tokens.weight, v.start, v.end
    )


@torch.no_grad()
def load_shards(model: CausalLM, weights: dict[str, Any], plan: ShardPlan) -> None:
    """Copy this rank's slice of each checkpoint tensor into the sharded model (strict names)."""
    params = dict(model.named_parameters())
    missing, unexpected = params.keys() - weights.keys(), weights.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]},"
            f" unexpected {sorted(unexpected)[:5]}"
        )
    for name, p in params.items():
        x = plan.take(name, weights[name])
        if x.shape != p.shape:
            raise ValueError(f"{name}: slice of shape {tuple(x.shape)}, shard is {tuple(p.shape)}")
        p.copy_(x)


def open_safetensors(folder: Path) -> dict[str, Any]:
    """Lazy slices of every tensor in a safetensors folder: each rank reads only its slice."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {folder}")
    out = {}
    for f in files:
        h = safe_open(str(f), framework="pt")
        out.update({k: h.get_slice(k) for k in h.keys()})  # noqa: SIM118 (not a dict)
    return out


class FullWeights:
    """The sharded model seen at full shapes, for loader.fill_synthetic.

    It yields each parameter as a full-shape tensor, in the model's order; once the filler has
    drawn it, this rank's slice is copied into the shard. Every TP size therefore draws the same
    numbers as one rank, one full tensor in memory at a time.
    """

    def __init__(self, model: CausalLM, plan: ShardPlan) -> None:
        self.model, self.plan = model, plan

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            full = torch.empty(self.plan.full_shape(name, p.shape), dtype=p.dtype, device=p.device)
            yield name, full
            with torch.no_grad():
                p.copy_(self.plan.take(name, full))

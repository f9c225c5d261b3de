"""Tokenizer and chat template through transformers (never by hand).

A GGUF's tokenizer is converted by transformers once and saved under ~/.cache/longserve, since the
conversion takes seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longserve.models.registry import ModelSource

CACHE = Path(os.environ.get("LONGSERVE_CACHE", Path.home() / ".cache" / "longserve"))


def cache_dir(path: Path, kind: str) -> Path:
    """A cache folder for what is derived from one file (keyed by its path, size and mtime)."""
    st = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return CACHE / kind / f"{path.stem}-{tag}"


def load_tokenizer(src: ModelSource, override: str | None = None) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer, or None for a bundled config without one (token-id prompts only)."""
    if override:
        return AutoTokenizer.from_pretrained(override)
    if src.kind == "hf":
        if not any((src.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        return AutoTokenizer.from_pretrained(str(src.path))
    if src.kind == "gguf":
        saved = cache_dir(src.path, "tokenizer")
        if (saved / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(saved))
        tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        tok.save_pretrained(str(saved))
        return tok
    return None


def chat_prompt(tok: PreTrainedTokenizerBase, user: str, system: str | None = None) -> str:
    """The user message wrapped in the model's own chat template, ready for the assistant turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

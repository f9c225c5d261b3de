"""Shared fixtures: the embedded model is loaded once per test session (ours and transformers')."""

from __future__ import annotations

import pytest
import torch

from longserve import LLM
from longserve.models.registry import embedded_gguf

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The embedded model in float32, a small KV pool; tests must leave no block in use."""
    return LLM(dtype="float32", num_kv_blocks=1024, seed=0)


@pytest.fixture(scope="session")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def assert_no_leaks(llm: LLM) -> None:
    """The block-accounting invariant: free + cached + in use = total, nothing in use when idle."""
    eng = llm.engine
    c = eng.pool.counts()
    assert c["free"] + c["cached"] + c["in_use"] == c["total"]
    assert not eng.has_unfinished()
    assert c["in_use"] == 0, c
    assert eng.pool.num_free == c["total"]

"""The engine against HF transformers on the embedded model and on small random Llama/Qwen2."""

from __future__ import annotations

import json

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.tokenizer import chat_prompt

from .conftest import assert_no_leaks

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published",
    "Water boils at",
]
CHAT = [
    "What is the tallest mountain on Earth?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a hash table is in one sentence.",
]


def test_greedy_matches_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = PLAIN + [chat_prompt(tok, c) for c in CHAT]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        ref = hf_model.generate(
            ids, max_new_tokens=48, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        expect = ref[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == expect, prompt
        assert out.outputs[0].text == tok.decode(expect, skip_special_tokens=True)
    assert_no_leaks(llm)


def _small(cfg_name: str, tmp_path) -> tuple[dict, str]:
    """A 2-layer random model of a bundled config with its real RoPE parameters, saved as HF."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longserve.models.registry import CONFIG_DIR

    d = json.loads((CONFIG_DIR / f"{cfg_name}.json").read_text())
    d.update(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
    )
    # The scaled RoPE must act within a short prompt: shrink the original window (test-only) so
    # 200-token prompts pass original_max_position_embeddings.
    if d.get("rope_scaling"):
        d["rope_scaling"]["original_max_position_embeddings"] = 64
        d["max_position_embeddings"] = max(256, d["max_position_embeddings"] // 512)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**d)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path / cfg_name
    model.save_pretrained(path)
    return d, str(path)


@pytest.mark.parametrize(
    "name", ["llama-3.3-70b", "llama-3.1-8b", "qwen2.5-7b-yarn", "qwen2.5-72b"]
)
def test_prompt_logprobs_match_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = _small(name, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=96)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (200, 131)]
    outs = ours.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            logp = ref(torch.tensor([p])).logits[0].float().log_softmax(-1)
        expect = logp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        got = torch.tensor(
            [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], p[1:], strict=True)]
        )
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        torch.testing.assert_close(got, expect, atol=1e-3, rtol=0)
        assert out.outputs[0].token_ids == [int(logp[-1].argmax())]


def test_rope_matches_transformers():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longserve.config import ModelConfig
    from longserve.models.registry import CONFIG_DIR, bundled_configs
    from longserve.models.rope import rope_parameters

    for name in bundled_configs():
        d = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        ours_inv, ours_attn = rope_parameters(ModelConfig.from_hf(d))
        hf = AutoConfig.for_model(**d)
        kind = hf.rope_parameters["rope_type"]
        if kind == "default":
            dim = (
                hf.head_dim
                if getattr(hf, "head_dim", None)
                else hf.hidden_size // hf.num_attention_heads
            )
            inv = 1.0 / (
                hf.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)
            )
            attn = 1.0
        else:
            inv, attn = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        assert torch.equal(ours_inv, inv), name
        assert ours_attn == pytest.approx(attn, abs=0), name
        if "yarn" in name:
            assert ours_attn > 1.0 and ModelConfig.from_hf(d).window == 131072


def test_batch_equals_one_at_a_time(llm):
    tok = llm.get_tokenizer()
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "the",
        "cat",
        "sleeps",
    ]
    prompts = [" ".join(words[: 2 + i % 11]) * (1 + i % 4) for i in range(12)]
    sp = SamplingParams(temperature=0, max_tokens=12)
    batched = llm.generate(prompts, sp, use_tqdm=False)
    for p, b in zip(prompts, batched, strict=True):
        single = llm.generate(p, sp, use_tqdm=False)[0]
        assert single.outputs[0].token_ids == b.outputs[0].token_ids, p
    assert len({len(tok.encode(p)) for p in prompts}) > 5
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda llm: llm.generate("", SamplingParams(), use_tqdm=False), "empty"),
        (
            lambda llm: llm.generate("hi", SamplingParams(max_tokens=0), use_tqdm=False),
            "max_tokens",
        ),
        (
            lambda llm: llm.generate("hi", SamplingParams(temperature=-1), use_tqdm=False),
            "temperature",
        ),
        (lambda llm: llm.generate("hi " * 9000, SamplingParams(), use_tqdm=False), "max_model_len"),
        (
            lambda llm: llm.generate("hi", SamplingParams(max_tokens=9000), use_tqdm=False),
            "max_model_len",
        ),
        (
            lambda llm: llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False),
            "out of range",
        ),
        (lambda llm: LLM("no-such-model"), "unknown model"),
    ],
)
def test_bad_input_is_refused_and_engine_survives(llm, make, match):
    with pytest.raises(ValueError, match=match):
        make(llm)
    assert_no_leaks(llm)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    assert_no_leaks(llm)


def test_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert_no_leaks(llm)


def test_sampling_api(llm):
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=10, logprobs=3)
    a, b = (llm.generate("Once upon a time", sp, use_tqdm=False)[0] for _ in range(2))
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    lps = a.outputs[0].logprobs
    assert len(lps) == 10
    for lp, t in zip(lps, a.outputs[0].token_ids, strict=True):
        assert t in lp and 3 <= len(lp) <= 4 and lp[t].logprob <= 0
    assert a.outputs[0].cumulative_logprob == pytest.approx(
        sum(lp[t].logprob for lp, t in zip(lps, a.outputs[0].token_ids, strict=True))
    )
    m = a.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_stop_strings_and_token_ids(llm):
    greedy = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=10), use_tqdm=False
    )[0].outputs[0]
    assert greedy.text.startswith(" Paris.")
    out = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=10, stop="."),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == " Paris" and out.finish_reason == "stop" and out.stop_reason == "."
    tid = greedy.token_ids[1]
    out = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tid]),
        use_tqdm=False,
    )
    assert (
        out[0].outputs[0].token_ids == greedy.token_ids[:2] and out[0].outputs[0].stop_reason == tid
    )
    assert_no_leaks(llm)


def test_prompt_token_ids_and_ignore_eos(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(chat_prompt(tok, "Say hi."))
    out = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids
    more = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 5, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert more.finish_reason == "length" and more.token_ids[: len(out.token_ids)] == out.token_ids

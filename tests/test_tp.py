"""Tensor parallelism on the CPU (gloo): TP=2 and TP=3 give TP=1's greedy tokens, each rank's KV
holds its own heads only, synthetic weights are the same at every TP size, and the benchmark runs.

float32 throughout: the all-reduces sum partial products in another order than one rank does, so
only the low bits of the hidden states may differ, and greedy tokens must not.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.config import ModelConfig
from longserve.dist.group import pack, unpack
from longserve.dist.shard import ShardPlan, head_ranges
from longserve.models.llama import CausalLM
from longserve.models.rope import Rotary
from longserve.ops.attention import AttnMeta

from .conftest import assert_no_leaks

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published",
    "Water boils at",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def tokens(llm: LLM, prompts: list, sp: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def small_config(arch: str, kv_heads: int, tied: bool) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=509,  # odd: the vocab-parallel rows are padded
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        qkv_bias=arch == "qwen2",
        name=arch,
    )


def hf_folder(path, cfg: ModelConfig, weights: bool) -> str:
    """config.json, and random weights of torch's default init as safetensors if asked."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    if weights:
        torch.manual_seed(0)
        model = CausalLM(cfg, Rotary(cfg, 64, torch.device("cpu")))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            del state["lm_head.weight"]
        save_file(state, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def embedded_tokens(llm) -> list[list[int]]:
    """TP=1's greedy tokens on the embedded model, for every TP size to match."""
    return tokens(llm, PROMPTS)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    return hf_folder(tmp_path_factory.mktemp("tp") / "llama", small_config("llama", 2, False), True)


def test_head_ranges():
    # 9 query / 3 KV heads (SmolLM2): whole KV groups, balanced, uneven at 2 ranks
    smol = replace(small_config("llama", 3, False), num_heads=9)
    assert [head_ranges(smol, r, 2) for r in range(2)] == [
        (range(0, 3), range(0, 1)),
        (range(3, 9), range(1, 3)),
    ]
    assert [head_ranges(smol, r, 3)[1] for r in range(3)] == [range(0, 1), range(1, 2), range(2, 3)]
    # fewer KV heads than ranks: query heads split evenly, each rank keeps the KV head they read
    gqa = replace(small_config("llama", 2, False), num_heads=8)
    assert [head_ranges(gqa, r, 4) for r in range(4)] == [
        (range(0, 2), range(0, 1)),
        (range(2, 4), range(0, 1)),
        (range(4, 6), range(1, 2)),
        (range(6, 8), range(1, 2)),
    ]
    with pytest.raises(ValueError, match="multiple"):
        head_ranges(gqa, 0, 3)


def test_step_inputs_pack_and_unpack():
    """What rank 0 broadcasts: nested structure, a dataclass, tensors of mixed dtypes and sizes."""
    meta = AttnMeta(
        slot_mapping=torch.arange(5),
        query_start=[0, 3, 5],
        context_lens=[3, 9],
        # 4 bytes of int32, then int64: the next slot is realigned
        block_tables=[torch.tensor([2], dtype=torch.int32), torch.tensor([0, 1, 4])],
    )
    obj = ("forward", (torch.tensor([7, 8, 9]), torch.ones(2, 3, dtype=torch.float16), meta))
    skeleton, buf = pack(obj, torch.device("cpu"))
    op, (ids, x, m) = unpack(skeleton, buf.clone())
    assert op == "forward" and torch.equal(ids, obj[1][0]) and torch.equal(x, obj[1][1])
    assert isinstance(m, AttnMeta) and m.query_start == [0, 3, 5] and m.context_lens == [3, 9]
    assert torch.equal(m.slot_mapping, meta.slot_mapping)
    assert [t.tolist() for t in m.block_tables] == [[2], [0, 1, 4]]
    assert [t.dtype for t in m.block_tables] == [torch.int32, torch.int64]


@pytest.mark.parametrize("tp", [2, 3])
def test_embedded_model_matches_tp1(embedded_tokens, tp):
    par = LLM(dtype="float32", num_kv_blocks=128, tensor_parallel_size=tp, seed=0)
    try:
        assert tokens(par, PROMPTS) == embedded_tokens
        layout = par.engine.tp.kv_layout
        heads = [tuple(x["kv_heads"]) for x in layout]
        assert heads == ([(0, 1), (1, 3)] if tp == 2 else [(0, 1), (1, 2), (2, 3)])
        assert {x["blocks"] for x in layout} == {128}
        assert par.engine.kv.k[0].shape[2] == 1  # rank 0: one of the 3 KV heads
        assert_no_leaks(par)
    finally:
        par.engine.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_small_model_matches_tp1(arch, llama_folder, tmp_path):
    """llama: 4 query / 2 KV heads, split, from safetensors slices; qwen2: 4 / 1, the KV head
    replicated, q/k/v bias, tied embeddings, synthetic weights."""
    synthetic = arch == "qwen2"
    if synthetic:
        path = hf_folder(tmp_path / arch, small_config(arch, 1, True), False)
    else:
        path = llama_folder
    kw = dict(dtype="float32", num_kv_blocks=64, max_num_batched_tokens=48, seed=3)
    kw["synthetic_weights"] = synthetic
    g = torch.Generator().manual_seed(1)
    prompts = [
        {"prompt_token_ids": torch.randint(509, (n,), generator=g).tolist()} for n in (70, 9, 33)
    ]
    ref = LLM(path, **kw)
    expect = tokens(ref, prompts)
    par = LLM(path, tensor_parallel_size=2, **kw)
    try:
        assert tokens(par, prompts) == expect
        assert len({tuple(t) for t in expect}) == 3
        layout = par.engine.tp.kv_layout
        want = [(0, 1), (0, 1)] if synthetic else [(0, 1), (1, 2)]
        assert [tuple(x["kv_heads"]) for x in layout] == want
        # one KV head per rank: each rank's block is half (split) or all (replicated) of TP=1's
        one_head = ref.engine.kv.bytes_per_token * 16 // ref.engine.model_config.num_kv_heads
        assert [x["block_bytes"] for x in layout] == [one_head, one_head]
        # rank 0's cache holds exactly TP=1's cache restricted to rank 0's KV head
        kv, kv1 = par.engine.kv, ref.engine.kv
        for mine, full in ((kv.k, kv1.k), (kv.v, kv1.v)):
            for a, b in zip(mine, full, strict=True):
                torch.testing.assert_close(a, b[:, :, 0:1], atol=1e-5, rtol=1e-4)
        if synthetic:  # rank 0 drew the same numbers as TP=1, then kept its slice
            plan = ShardPlan(ref.engine.model_config, 0, 2)
            full = dict(ref.engine.model.named_parameters())
            for name, p in par.engine.model.named_parameters():
                assert torch.equal(p, plan.take(name, full[name])), name
        assert_no_leaks(par)
    finally:
        par.engine.shutdown()


def test_refused_split_spawns_nothing(tmp_path):
    import torch.distributed as dist

    path = hf_folder(tmp_path / "qwen2", small_config("qwen2", 1, True), False)
    with pytest.raises(ValueError, match="divide the 4 query heads"):
        LLM(path, synthetic_weights=True, tensor_parallel_size=3)
    assert not dist.is_initialized()


def test_benchmark_cpu_path(llama_folder, tmp_path):
    from benchmarks import tp_bench

    out = tmp_path / "tp.json"
    argv = ["--model", llama_folder, "--tp", "2", "--context", "96", "--output-tokens", "4"]
    argv += ["--max-num-batched-tokens", "32", "--kv-cache-dtype", "auto", "--out", str(out)]
    assert tp_bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert "error" not in r
    m = r["measured"]
    assert m["prompt_tokens"] == 92 and m["prefill_steps"] == 3 and m["decode_steps"] == 3
    assert m["ttft_s"] > 0 and m["tpot_ms"] > 0
    assert [x["kv_heads"] for x in r["engine"]["kv_layout"]] == [[0, 1], [1, 2]]
    assert r["prediction"]["predicted"]["tpot_ms"] > 0
    assert set(r["prediction"]["vs_measured"]) == {"ttft_s", "tpot_ms"}


@pytest.mark.gpu
def test_cuda_graphs_under_tp_match_eager(llama_folder):
    """Two GPUs: every rank captures its decode graphs (all-reduces inside) and replays them when
    rank 0 does; the greedy tokens are those of the eager TP engine, and no block leaks."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    kw = dict(dtype="bfloat16", device="cuda", num_kv_blocks=256, max_num_batched_tokens=64)
    kw["tensor_parallel_size"] = 2
    g = torch.Generator().manual_seed(2)
    prompts = [
        {"prompt_token_ids": torch.randint(509, (n,), generator=g).tolist()} for n in (5, 80, 33)
    ]
    eager = LLM(llama_folder, enforce_eager=True, **kw)
    try:
        expect = tokens(eager, prompts)
    finally:
        eager.engine.shutdown()
    graphed = LLM(llama_folder, **kw)
    try:
        assert graphed.engine.runner.graphs is not None
        assert tokens(graphed, prompts) == expect
        assert_no_leaks(graphed)
    finally:
        graphed.engine.shutdown()

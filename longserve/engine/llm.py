"""LLMEngine (add requests, step, abort) and LLM, the offline API with vLLM's names."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from longserve.config import EngineConfig, ModelConfig, normalize_rope_scaling
from longserve.dist import group as tp_group
from longserve.dist.shard import (
    FullWeights,
    ShardPlan,
    load_shards,
    local_config,
    open_safetensors,
    shard_model,
)
from longserve.dist.worker import TPDriver, run_worker
from longserve.engine.request import Request, RequestOutput
from longserve.engine.runner import ModelRunner
from longserve.engine.sampling import SamplingParams
from longserve.engine.scheduler import Scheduler, SchedulerStats
from longserve.kv.blocks import BlockPool
from longserve.kv.cache import KVCache
from longserve.kv.calibrate import CHECKPOINT_SCALE_NAMES, kv_scales
from longserve.kv.quant import kv_bytes_per_token
from longserve.models import loader
from longserve.models.llama import CausalLM
from longserve.models.registry import ModelSource, resolve
from longserve.models.rope import Rotary
from longserve.ops import attention, quant_linear
from longserve.tokenizer import load_tokenizer

log = logging.getLogger("longserve")

Prompt = str | dict


def load_model(
    cfg: EngineConfig, src: ModelSource, tp: tp_group.TPGroup | None = None
) -> tuple[ModelConfig, CausalLM, int]:
    """Config, decoder with weights on the device, and the max_model_len in force.

    Under tensor parallelism the decoder is this rank's shard: sharded while still on the meta
    device, so the rank only ever allocates and reads its own slice of the weights.
    """
    weights = None
    if src.kind == "gguf":
        with tp_group.rank0_first(tp):  # the dequantized weights are cached once
            mcfg, weights = loader.load_gguf(src.path, src.name)
    elif src.kind == "hf":
        mcfg = loader.hf_config(src.path)
    else:
        mcfg = ModelConfig.from_json(src.path)
        if not cfg.synthetic_weights:
            raise ValueError(
                f"{src.name} is a bundled config without weights: pass --synthetic-weights"
                " (random weights of the real shape), or a local folder or GGUF with weights"
            )
    if cfg.rope_scaling is not None:
        mcfg = replace(mcfg, rope_scaling=normalize_rope_scaling(cfg.rope_scaling))
    if cfg.num_layers:
        mcfg = replace(mcfg, num_layers=cfg.num_layers)
    max_len = cfg.max_model_len or mcfg.window
    if max_len > mcfg.window:
        log.warning("max_model_len %d is past the model's window %d", max_len, mcfg.window)
    device, dtype = cfg.torch_device, cfg.torch_dtype
    rotary = Rotary(mcfg, max_len, device)
    with torch.device("meta"):
        model = CausalLM(mcfg, rotary)
    plan = None if tp is None else ShardPlan(mcfg, tp.rank, tp.size)
    if plan is not None:
        shard_model(model, plan)
    model = model.to(dtype)
    layerwise = cfg.synthetic_weights and plan is None and cfg.weights in quant_linear.QUANTIZED
    if layerwise:
        quant_linear.materialize_quantized(
            model, cfg.weights, device, lambda m, i: loader.fill_synthetic(m, cfg.seed + i)
        )
    else:
        model = model.to_empty(device=device)
    if src.kind == "hf" and not cfg.synthetic_weights:
        weights = loader.load_safetensors(src.path) if plan is None else open_safetensors(src.path)
    if weights is not None:
        if mcfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        keep = {
            k: v
            for k, v in weights.items()
            if (not k.startswith("model.layers.") or int(k.split(".")[2]) < mcfg.num_layers)
            and not k.endswith(CHECKPOINT_SCALE_NAMES)  # KV scales: read by kv_scales()
        }
        if plan is None:
            quant_linear.adopt_checkpoint(model, keep)  # AWQ / compressed-tensors layers
            model.load_state_dict(keep, strict=True)
        else:
            load_shards(model, keep, plan)
    elif not layerwise:
        loader.fill_synthetic(model if plan is None else FullWeights(model, plan), cfg.seed)
    model.tie_weights()
    quant_linear.quantize_model(model, cfg.weights)  # after sharding: --weights fp8 / int4
    return mcfg, model.eval(), max_len


class LLMEngine:
    """The engine: requests in, one scheduled step at a time, outputs out."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.source = resolve(cfg.model)
        self.tp = tp_group.join(cfg)  # None on one rank; ranks > 0 never leave __init__
        with tp_group.rank0_first(self.tp):  # a GGUF's tokenizer is converted and cached once
            self.tokenizer = load_tokenizer(self.source, cfg.tokenizer)
        self.model_config, self.model, self.max_model_len = load_model(cfg, self.source, self.tp)
        m, device = local_config(self.model_config, self.tp), cfg.torch_device  # this rank's heads
        dtype, fmt, group = cfg.torch_dtype, cfg.kv_cache_dtype, cfg.kv_int4_group_size
        scales = kv_scales(cfg, self.source, m, self.model, self.tokenizer, self.max_model_len)
        block_bytes = cfg.block_size * kv_bytes_per_token(
            m.num_layers, m.num_kv_heads, m.head_dim, fmt, dtype.itemsize, group
        )
        num_blocks = cfg.num_kv_blocks or self._auto_blocks(block_bytes)
        if self.tp is not None:
            num_blocks = self.tp.agree_kv(num_blocks, self.model_config, block_bytes)
        self.kv = KVCache(
            m.num_layers,
            num_blocks,
            cfg.block_size,
            m.num_kv_heads,
            m.head_dim,
            dtype,
            device,
            fmt,
            None if scales is None else scales.scales,
            group,
        )
        self.pool = BlockPool(
            num_blocks, cfg.block_size, cfg.enable_prefix_caching, extra_key=self.kv.cache_key
        )
        if not cfg.enable_chunked_prefill:
            cfg = replace(
                cfg, max_num_batched_tokens=max(cfg.max_num_batched_tokens, self.max_model_len)
            )
        self.scheduler = Scheduler(cfg, self.pool)
        driver = self.model if self.tp is None else TPDriver(self.model, self.tp)
        # under TP rank 0 has every rank capture (TPDriver.decode_graphs); the others follow
        rank0 = self.tp is None or self.tp.rank == 0
        graphs = device.type == "cuda" and not cfg.enforce_eager and rank0
        # the kernels' dtypes; the torch reference (attention.use_kernels off) cannot be captured
        graphs = graphs and dtype in (torch.bfloat16, torch.float16) and attention.use_kernels
        self.runner = ModelRunner(
            driver, self.kv, device, self.max_model_len, cfg.max_num_seqs, cuda_graphs=graphs
        )
        self.eos_ids = set(m.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._gen_seed = torch.Generator().manual_seed(cfg.seed)
        log.info(
            "%s: %d layers, %d KV blocks of %d tokens (%.2f GiB), max_model_len %d",
            self.source.name,
            m.num_layers,
            num_blocks,
            cfg.block_size,
            num_blocks * block_bytes / 2**30,
            self.max_model_len,
        )
        if self.tp is not None and self.tp.rank > 0:
            run_worker(self.model, self.kv, self.tp)  # serves rank 0's steps, then exits

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (also done at exit); the engine is done after."""
        if self.tp is not None:
            self.tp.shutdown()

    def _auto_blocks(self, block_bytes: int) -> int:
        if self.cfg.torch_device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            budget = free - (1 - self.cfg.gpu_memory_utilization) * total
        else:
            budget = self.cfg.kv_cache_memory_gb * 2**30
        return max(1, int(budget // block_bytes))

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(
                f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt)}"
            )
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source.name} has no tokenizer: pass prompt_token_ids or --tokenizer"
            )
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate and queue one request; bad input raises ValueError and changes nothing."""
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}"
            )
        n, window = len(ids), self.max_model_len
        if n >= window:
            raise ValueError(
                f"the prompt has {n} tokens; max_model_len is {window}, and at least one token"
                " must be generated (raise max_model_len on purpose to go past the window)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else window - n
        if n + max_tokens > window:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} is past"
                f" max_model_len {window}"
            )
        if -(-(n + max_tokens) // self.cfg.block_size) > self.pool.num_blocks:
            raise ValueError(
                f"{n + max_tokens} tokens need more KV blocks than the pool holds "
                f"({self.pool.num_blocks} of {self.cfg.block_size} tokens)"
            )
        rid = request_id or str(next(self._ids))
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = (
            params.seed
            if params.seed is not None
            else int(torch.randint(2**62, (1,), generator=self._gen_seed))
        )
        req = Request(rid, text, ids, params, max_tokens, torch.Generator().manual_seed(seed))
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            req.finish_reason = "abort"
            self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> SchedulerStats:
        """Prefix-cache, KV-block and queue counters, as the server and reports read them."""
        return self.scheduler.stats()

    def step(self) -> list[Request]:
        """Run one scheduled step; return the requests that got a token (finished ones too)."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        result = self.runner.step(batch.items)
        now = time.time()
        touched = []
        for req, n in batch.items:
            self.scheduler.computed(req, n)
            if req.request_id in result.prompt_logprobs:
                req.prompt_logprobs += result.prompt_logprobs[req.request_id]
            smp = result.samples.get(req.request_id)
            if smp is None:
                continue
            req.output_token_ids.append(smp.token)
            if req.logprobs is not None:
                req.logprobs.append(smp.logprobs)
                req.cumulative_logprob += smp.logprobs[smp.token].logprob
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            self._check_stop(req, smp.token)
            if req.finish_reason is not None:
                req.metrics.finished_time = now
                self.scheduler.finish(req)
                self.requests.pop(req.request_id, None)
            touched.append(req)
        return touched

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        if token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif token in self.eos_ids and not p.ignore_eos:
            req.finish_reason = "stop"
        elif len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.finish_reason = "length"
        if p.stop or req.finish_reason is not None:
            req.text = self.detokenize(req.output_token_ids, p.skip_special_tokens)
        for s in p.stop:
            i = req.text.find(s)
            if i >= 0:
                req.text = req.text[: i + len(s) if p.include_stop_str_in_output else i]
                req.finish_reason, req.stop_reason = "stop", s
                return

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class LLM:
    """Offline generation: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str = "smollm2-135m", **kwargs) -> None:
        unknown = set(kwargs) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched; outputs come back in the order of the prompts."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        reqs = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                reqs.append(self.engine.add_request(p, sp))
        except ValueError:
            for r in reqs:
                self.engine.abort(r.request_id)
            raise
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm, leave=False)
        while self.engine.has_unfinished():
            done = sum(r.finished for r in self.engine.step())
            bar.update(done)
        bar.close()
        return [r.output() for r in reqs]

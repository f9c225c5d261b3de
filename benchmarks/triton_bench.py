"""The Triton kernels and the engine on CUDA, against their peers, in one call (JSON out).

copy     the device-to-device copy ceiling, bytes read + written, measured first in the same call
decode   paged decode on Llama-3.3-70B's layer shape (64 q / 8 KV heads, d=128, blocks of 16):
         16K/64K/128K x batch 1/8/32 in bf16, fp8 e4m3 (per-head scales) and int4 (group 64),
         by the engine's kernel on Hopper (warp_decode.py, Gluon);
         time, KV bytes read per second (group scales counted), against SDPA on the same bf16
         data laid out contiguously and against decode.py's Triton kernel on the same pages.
         The engine's default launch (warp_decode_config, num_splits) and a sweep of configs
         are timed per point; the default's figure and the best are kept.
int4_groups  int4 decode at 128K x 8 and x 32 by group size (16 to 128 channels), against bf16
prefill  causal prefill of one 16K and one 128K prompt, TFLOP/s, through the paged extend kernel
         (K/V gathered through the block table: chunked prefill, prefix-cache hits) and through
         causal_prefill (the prompt's own K/V, contiguous, by TMA: the engine's path for whole
         prompts in a bf16 cache), against SDPA's cuDNN and flash backends on contiguous tensors.
chunk    the last 8K queries of a 64K and a 128K prompt over all of it (chunked prefill, prefix
         hits), TFLOP/s: paged_extend on pages of 16 and paged_prefill (TMA, one page a key
         tile) on pages of 32 to 256, against SDPA flash (lower-right causal) and cuDNN (mask).
e2e      decode tokens/s of the engine at batch 1 and 32, CUDA graphs on and off, against HF
         transformers (static cache, SDPA, eager) on the same weights: the embedded model (its
         GGUF given by --gguf) and a synthetic Llama-3.1-8B.

    python benchmarks/triton_bench.py --out results.json [--gguf SmolLM2.gguf] [--sections ...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from benchmarks.common import environment, write
from longserve.kv.cache import paged_pool
from longserve.ops.triton import (
    PagedKV,
    causal_prefill,
    paged_decode,
    paged_extend,
    paged_prefill,
    warp_decode,
)
from longserve.ops.triton.decode import ZD_GROUPS, num_splits
from longserve.ops.triton.kv import extend_config, prefill_config

HQ, HKV, D, BS = 64, 8, 128, 16
GROUP = 64  # int4 channels per scale/zero pair
DEV = torch.device("cuda")
# warp_decode.py's launches swept per format: (block_n, num_warps, ring slots, waves of programs
# over the SMs); the defaults (warp_decode_config) first: bf16 32 keys in 2 slots and fp8 32 in
# 3, four programs an SM; int4 (groups of 64) 64 keys in 3 slots, eight
WARP_CONFIGS = {
    "bf16": [(32, 1, 2, 4), (32, 1, 3, 4), (16, 1, 3, 4), (16, 1, 4, 4), (16, 1, 3, 8), (32, 1, 2, 6)],
    "fp8_e4m3": [(32, 1, 3, 4), (32, 1, 2, 4), (64, 1, 3, 4), (64, 1, 2, 4), (32, 1, 3, 8), (16, 1, 4, 8)],
    "int4": [(64, 1, 3, 8), (64, 1, 2, 8), (64, 1, 3, 4), (64, 1, 3, 6), (32, 1, 3, 8), (32, 1, 3, 12)],
}  # fmt: skip
PREFILL_CONFIGS = [
    extend_config(D, HQ // HKV),  # the default: BM=64, TM=8, BN=64, 4 warps, 3 stages
    dict(BM=128, TM=16, BN=64, num_warps=8, num_stages=2),
    dict(BM=128, TM=16, BN=64, num_warps=8, num_stages=3),
    dict(BM=128, TM=16, BN=128, num_warps=8, num_stages=2),
]


def bench_ms(fn, rep: int = 200) -> float:  # noqa: ANN001
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def events_ms(fn, repeats: int = 3) -> float:  # noqa: ANN001
    """Median of CUDA-event timings after one warm-up run, for calls of a second or so."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def copy_ceiling() -> dict:
    x = torch.randn(2**30, device=DEV)  # 4 GiB, far past the L2
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return {"bytes": 2 * x.numel() * 4, "ms": ms, "tb_s": 2 * x.numel() * 4 / ms / 1e9}


def paged_cache(
    fmt: str, blocks: int, device: torch.device = DEV, group: int = GROUP, block_size: int = BS
) -> tuple[PagedKV, int]:
    """Random K/V pools of one layer in a format, laid out as the engine's cache lays them out
    (paged_pool), and the bytes a token's K+V takes in it (int4: `group` channels a scale and
    zero)."""

    def pool(dtype: torch.dtype, width: int = D) -> torch.Tensor:
        return paged_pool(blocks, block_size, HKV, width, dtype, device)

    def randn(dtype: torch.dtype) -> torch.Tensor:
        return pool(dtype).copy_(torch.randn(blocks, block_size, HKV, D, device=device))

    if fmt == "bf16":
        return PagedKV(randn(torch.bfloat16), randn(torch.bfloat16)), 2 * HKV * D * 2
    if fmt == "fp8_e4m3":
        s = torch.rand(2, HKV, device=device) * 0.01 + 0.001
        k, v = randn(torch.float8_e4m3fn), randn(torch.float8_e4m3fn)
        return PagedKV(k, v, s[0], s[1]), 2 * HKV * D

    def params() -> torch.Tensor:
        return pool(torch.float16, D // group).uniform_(0.01, 0.11)

    k, v = pool(torch.uint8, D // 2).random_(0, 256), pool(torch.uint8, D // 2).random_(0, 256)
    kv = PagedKV(k, v, params(), params(), params() * 100, params() * 100, group)
    return kv, 2 * HKV * (D // 2 + D // group * 4)


def decode_inputs(length: int, batch: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pages, a block table of scattered pages (as a busy pool has them), lengths and queries."""
    blocks = batch * (length // BS)
    table = torch.randperm(blocks, device=DEV).int().view(batch, -1)
    seq = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=DEV)
    return blocks, table, seq, q


def decode_point(length: int, batch: int) -> list[dict]:
    blocks, table, seq, q = decode_inputs(length, batch)
    scale = D**-0.5
    rows = []
    bf16_ms = bf16_best = None
    for fmt in ("bf16", "fp8_e4m3", "int4"):
        kv, tok_bytes = paged_cache(fmt, blocks)
        nbytes = batch * length * tok_bytes + (2 * HKV * 4 if fmt == "fp8_e4m3" else 0)
        times = {"default": bench_ms(lambda kv=kv: paged_decode(q, kv, table, seq, scale, length))}
        for bn, warps, stages, waves in WARP_CONFIGS[fmt]:
            splits = num_splits(batch, HKV, length, DEV, waves)

            def run(kv=kv, bn=bn, warps=warps, stages=stages, splits=splits):  # noqa: ANN202
                return paged_decode(q, kv, table, seq, scale, length, splits, bn, warps, stages)

            times[f"bn{bn}_w{warps}_s{stages}_x{waves}"] = bench_ms(run)
        default = "default"
        best = min(times, key=times.get)
        row = {
            "format": fmt,
            "context": length,
            "batch": batch,
            "kv_bytes": nbytes,
            "ms": times[default],
            "tb_s": nbytes / times[default] / 1e9,
            "best_config": best,
            "best_ms": times[best],
            "best_tb_s": nbytes / times[best] / 1e9,
            "configs_ms": times,
        }
        # the Triton kernel (decode.py's default launch) on the same pages: the peer it replaced
        row["triton_ms"] = bench_ms(
            lambda kv=kv: paged_decode(q, kv, table, seq, scale, length, gluon=False)
        )
        row["triton_tb_s"] = nbytes / row["triton_ms"] / 1e9
        row["vs_triton"] = times[default] / row["triton_ms"]
        if fmt == "bf16":
            bf16_ms, bf16_best = times[default], times[best]
            k = kv.k[table.long()].reshape(batch, length, HKV, D).transpose(1, 2).contiguous()
            v = kv.v[table.long()].reshape(batch, length, HKV, D).transpose(1, 2).contiguous()
            qs = q.unsqueeze(2)

            def sdpa(qs=qs, k=k, v=v):  # noqa: ANN202
                return F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)

            row["sdpa_ms"] = bench_ms(sdpa)
            row["sdpa_tb_s"] = nbytes / row["sdpa_ms"] / 1e9
            out = paged_decode(q, kv, table, seq, scale, length)
            row["rel_err_vs_sdpa"] = rel_err(out, sdpa().squeeze(2))
            del k, v
        else:
            row["vs_bf16"] = times[default] / bf16_ms
            row["best_vs_bf16_best"] = times[best] / bf16_best
        rows.append(row)
        print(
            f"decode {fmt:9s} L={length:6d} B={batch:2d} {times[default]:8.3f} ms"
            f" {row['tb_s']:.2f} TB/s | best {times[best]:8.3f} ms {row['best_tb_s']:.2f} TB/s"
            f" {best} | triton {row['triton_ms']:.3f} ms"
            + (f" | sdpa {row['sdpa_ms']:.3f} ms" if "sdpa_ms" in row else ""),
            flush=True,
        )
        del kv
        torch.cuda.empty_cache()
    return rows


def int4_groups_point(length: int, batch: int) -> dict:
    """Int4 decode by group size against bf16 on the same pages, the engine's default launch:
    more groups a head mean more scales and zeros per key. Groups of 32 and 64 run
    warp_decode.py's kernel, 16 and 128 decode.py's (there, from ZD_GROUPS groups, the zero-point
    terms on the tensor cores)."""
    blocks, table, seq, q = decode_inputs(length, batch)

    def ms(kv: PagedKV) -> float:
        return bench_ms(lambda: paged_decode(q, kv, table, seq, D**-0.5, length))

    kv, _ = paged_cache("bf16", blocks)
    res = {"context": length, "batch": batch, "bf16_ms": ms(kv), "groups": {}}
    del kv
    for group in (16, 32, 64, 128):
        kv, tok_bytes = paged_cache("int4", blocks, group=group)
        t = ms(kv)
        gluon = warp_decode.serves(kv, D, HQ // HKV)
        res["groups"][str(group)] = {
            "ms": t,
            "vs_bf16": t / res["bf16_ms"],
            "tb_s": batch * length * tok_bytes / t / 1e9,
            "kernel": "warp_decode" if gluon else "decode",
            "zero_terms_on_tensor_cores": D // group >= ZD_GROUPS and not gluon,
        }
        print(f"int4 groups of {group:3d} L={length} B={batch}: {t:.3f} ms, "
              f"{t / res['bf16_ms']:.3f} x bf16", flush=True)  # fmt: skip
        del kv
        torch.cuda.empty_cache()
    return res


def sdpa_peer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: SDPBackend,
    flops: float,
    outs: dict,
    mask: torch.Tensor | None = None,
) -> dict:
    """One SDPA backend on [1, H, L, D], causal or under `mask` (K/V expanded to all heads if
    GQA is refused): its time, TFLOP/s, and how far each of our outputs lies from its own."""
    for gqa in (True, False):
        kk = k if gqa else k.repeat_interleave(HQ // HKV, 1)
        vv = v if gqa else v.repeat_interleave(HQ // HKV, 1)

        def run(kk=kk, vv=vv, gqa=gqa):  # noqa: ANN202
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
                )

        try:
            r = {"ms": events_ms(run), "gqa": "native" if gqa else "expanded"}
        except RuntimeError as e:
            err = str(e).splitlines()[0][:200]
            continue
        it = run()[0].transpose(0, 1)
        r.update({f"rel_err_{o}_vs_it": rel_err(x, it) for o, x in outs.items()})
        r["tflop_s"] = flops / r["ms"] / 1e9
        return r
    return {"error": err}


def prefill_point(length: int, configs: list[dict]) -> dict:
    nb = length // BS
    table = torch.randperm(nb, device=DEV).int().view(1, nb)
    seq = torch.tensor([length], dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, length], dtype=torch.int32, device=DEV)
    kv, _ = paged_cache("bf16", nb)
    q = torch.randn(length, HQ, D, dtype=torch.bfloat16, device=DEV)
    flops = 2 * length * length * HQ * D  # causal: half of 4 L^2 H D
    res = {"context": length, "flops": flops, "configs": {}}
    ours = None
    for cfg in configs:
        name = "bm{BM}_bn{BN}_w{num_warps}_s{num_stages}".format(**cfg)

        def run(q=q, kv=kv, cfg=cfg):  # noqa: ANN202
            return paged_extend(q, kv, table, seq, cu, length, D**-0.5, cfg)

        ms = events_ms(run)
        res["configs"][name] = {"ms": ms, "tflop_s": flops / ms / 1e9}
        ours = ours if ours is not None else run()
    k = kv.k[table.long()].reshape(length, HKV, D)  # the prompt's K/V in order, contiguous
    v = kv.v[table.long()].reshape(length, HKV, D)

    def whole(q=q, k=k, v=v, cu=cu):  # noqa: ANN202
        return causal_prefill(q, k, v, cu, length, D**-0.5)

    ms = events_ms(whole)
    res["whole_prompt"] = {"ms": ms, "tflop_s": flops / ms / 1e9, "config": prefill_config()}
    outs = {"ours": ours, "whole": whole()}
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    for label, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        res[label] = sdpa_peer(qs, ks.contiguous(), vs.contiguous(), backend, flops, outs)
    best = max(res["configs"], key=lambda c: res["configs"][c]["tflop_s"])
    res["default"] = next(iter(res["configs"]))
    res["best"] = best
    print(
        f"prefill L={length}: ours {res['configs'][res['default']]['tflop_s']:.0f} TFLOP/s"
        f" (best {res['configs'][best]['tflop_s']:.0f}, {best}) | whole prompt"
        f" {res['whole_prompt']['tflop_s']:.0f} | cudnn"
        f" {res['cudnn'].get('tflop_s', 0):.0f} | flash {res['flash'].get('tflop_s', 0):.0f}",
        flush=True,
    )
    del kv, q, k, v, qs, ks, vs, outs
    torch.cuda.empty_cache()
    return res


def chunk_point(context: int, chunk: int) -> dict:
    """The last `chunk` queries of a `context`-token prompt over all of it (a chunked prefill's
    last step; a prefix-cache hit's new tokens): paged_extend on pages of 16 and paged_prefill on
    pages of 32 to 256 (the same keys in each, bf16; then fp8 e4m3 with per-head scales on pages
    of 16 and 128), against SDPA on contiguous bf16 K/V: flash with lower-right causal alignment
    (causal_lower_right) and cuDNN with that mask as a boolean tensor."""
    q = torch.randn(chunk, HQ, D, dtype=torch.bfloat16, device=DEV)
    k, v = torch.randn(2, context, HKV, D, dtype=torch.bfloat16, device=DEV)
    seq = torch.tensor([context], dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEV)
    flops = 4 * HQ * D * (chunk * (context - chunk) + chunk * (chunk + 1) // 2)
    res = {"context": context, "chunk": chunk, "flops": flops}
    outs = {}
    scales = [x.abs().amax((0, 2)).float() / 448 for x in (k, v)]  # per KV head
    fp8 = [(x / sc[:, None]).to(torch.float8_e4m3fn) for x, sc in zip((k, v), scales, strict=True)]
    for fmt, bs in [("bf16", b) for b in (16, 32, 64, 128, 256)] + [("fp8", 16), ("fp8", 128)]:
        nb = context // bs
        table = torch.randperm(nb, device=DEV)
        kv, _ = paged_cache("bf16" if fmt == "bf16" else "fp8_e4m3", nb, block_size=bs)
        for pool, x in zip((kv.k, kv.v), (k, v) if fmt == "bf16" else fp8, strict=True):
            pool[table] = x.view(nb, bs, HKV, D)
        if fmt == "fp8":
            kv = PagedKV(kv.k, kv.v, *scales)
        args = (q, kv, table.int().view(1, nb), seq, cu, chunk, D**-0.5)
        fn, name = (paged_extend, "paged_extend") if bs == 16 else (paged_prefill, "paged_prefill")
        name += f"_bs{bs}" if fmt == "bf16" else f"_fp8_bs{bs}"
        ms = events_ms(lambda fn=fn, args=args: fn(*args))
        res[name] = {"ms": ms, "tflop_s": flops / ms / 1e9}
        outs[name] = fn(*args)
        del kv
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    mask = (
        torch.arange(context, device=DEV)
        <= torch.arange(context - chunk, context, device=DEV)[:, None]
    )
    for label, backend, m in (
        ("flash_lower_right", SDPBackend.FLASH_ATTENTION, causal_lower_right(chunk, context)),
        ("cudnn_mask", SDPBackend.CUDNN_ATTENTION, mask),
    ):
        res[label] = sdpa_peer(qs, ks, vs, backend, flops, outs, m)
    print(
        f"chunk {chunk} of {context}: "
        + " | ".join(
            f"{n} {r.get('tflop_s', 0):.0f}" for n, r in res.items() if isinstance(r, dict)
        )
        + " TFLOP/s",
        flush=True,
    )
    del q, k, v, qs, ks, vs, mask, outs
    torch.cuda.empty_cache()
    return res


def engine_decode(model: str, batches: list[int], new: int, prompt: int, **kw) -> tuple:
    """Decode tokens/s of the engine per batch, CUDA graphs on then off; returns the engine too."""
    from longserve import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype="bfloat16",
        enable_prefix_caching=False,
        max_num_seqs=max(batches),
        max_model_len=8192,
        seed=0,
        **kw,
    )
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_tokens=new + 1, ignore_eos=True)
    graphs = llm.engine.runner.graphs  # a DecodeGraphs; None runs every step eagerly
    res = {"graph_sizes": sorted(graphs.graphs)}
    for label, g in (("graphs", graphs), ("eager", None)):
        llm.engine.runner.graphs = g
        for b in batches:
            prompts = [
                {"prompt_token_ids": torch.randint(0, vocab, (prompt,), generator=gen).tolist()}
                for _ in range(b)
            ]
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
            torch.cuda.synchronize()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            t0 = min(o.metrics.first_token_time for o in outs)
            t1 = max(o.metrics.finished_time for o in outs)
            res[f"{label}_b{b}_tok_s"] = b * new / (t1 - t0)
            print(
                f"e2e {model} ours {label} B={b}: {res[f'{label}_b{b}_tok_s']:.1f} tok/s",
                flush=True,
            )
    llm.engine.runner.graphs = graphs
    return res, llm


@torch.inference_mode()
def hf_decode(llm, batches: list[int], new: int, prompt: int) -> dict:  # noqa: ANN001
    """HF transformers on the engine's own weights: static cache, SDPA, eager."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = llm.engine.model_config
    cfg = AutoConfig.for_model(**mcfg.to_hf())
    with torch.device(DEV):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(llm.engine.model.state_dict(), strict=False)
    hf.tie_weights()
    hf.eval()
    res = {"missing_keys": missing, "unexpected_keys": unexpected}
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        ids = torch.randint(0, mcfg.vocab_size, (b, prompt), generator=gen).to(DEV)

        def run(n: int, hf=hf, ids=ids):  # noqa: ANN202
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                cache_implementation="static",
                disable_compile=True,
                pad_token_id=0,
            )

        run(4)
        t = {}
        for n in (1, new + 1):
            torch.cuda.synchronize()
            s = time.perf_counter()
            run(n)
            torch.cuda.synchronize()
            t[n] = time.perf_counter() - s
        res[f"b{b}_tok_s"] = b * new / (t[new + 1] - t[1])
        print(f"e2e {mcfg.name} transformers B={b}: {res[f'b{b}_tok_s']:.1f} tok/s", flush=True)
    del hf
    return res


def e2e(model: str, **kw) -> dict:
    batches, new, prompt = [1, 32], 64, 128
    res, llm = engine_decode(model, batches, new, prompt, **kw)
    res["transformers"] = hf_decode(llm, batches, new, prompt)
    res.update(model=model, new_tokens=new, prompt_tokens=prompt, max_model_len=8192)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n    python")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--gguf", default=None, help="the embedded model's GGUF file (e2e section)")
    p.add_argument(
        "--sections",
        default="copy,decode,int4_groups,prefill,chunk,e2e",
        help="comma-separated sections to run (described above)",
    )
    args = p.parse_args()
    sections = args.sections.split(",")
    result = {"environment": environment(), "errors": {}}
    result["environment"]["sms"] = torch.cuda.get_device_properties(DEV).multi_processor_count

    def section(name: str, fn) -> None:  # noqa: ANN001
        if name not in sections:
            return
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:  # keep what the other sections measured
            result["errors"][name] = traceback.format_exc()[-3000:]
            print(result["errors"][name], flush=True)
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        write(args.out, result)

    section("copy", copy_ceiling)

    def decode() -> list[dict]:
        decode_point(16384, 1)  # warm-up, discarded: a cold GPU's first point timed unevenly
        return [r for n in (16384, 65536, 131072) for b in (1, 8, 32) for r in decode_point(n, b)]

    section("decode", decode)
    section("int4_groups", lambda: [int4_groups_point(131072, b) for b in (8, 32)])

    def prefill() -> list[dict]:
        short = prefill_point(16384, PREFILL_CONFIGS)
        cfgs = [PREFILL_CONFIGS[0]]
        best = PREFILL_CONFIGS[list(short["configs"]).index(short["best"])]
        cfgs += [best] if best is not PREFILL_CONFIGS[0] else []
        return [short, prefill_point(131072, cfgs)]

    section("prefill", prefill)
    section("chunk", lambda: [chunk_point(65536, 8192), chunk_point(131072, 8192)])

    def e2e_all() -> dict:
        out = {}
        if args.gguf:
            out["smollm2-135m"] = e2e(args.gguf, num_kv_blocks=2048)
        out["llama-3.1-8b"] = e2e("llama-3.1-8b", synthetic_weights=True, num_kv_blocks=2048)
        return out

    section("e2e", e2e_all)


if __name__ == "__main__":
    main()

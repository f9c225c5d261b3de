"""Attention over the paged KV cache.

The torch reference serves the CPU and any device without kernels: for each sequence it gathers
the sequence's cached keys and values through its block table and runs SDPA with the causal
offset of its query chunk (a chunk of a prefill, a whole prompt, or one decode token). On CUDA,
with bf16/fp16 queries and the tensor fields of AttnMeta set, the Triton kernels run instead
(ops/triton): paged decode when every sequence brings one query. Otherwise, on Hopper, sequences
that bring a query tile (TMA_QUERIES) or more take the warp-specialized TMA kernel, one CTA per
tile of one query head: over the step's own keys when each of them is a whole prompt with
nothing cached before it in a bf16/fp16 cache (causal_prefill), else over pages of 64 tokens or
more of a bf16/fp16 or fp8 cache (paged_prefill). The paged extend kernel, whose rows pack a KV
head's query heads, takes the rest: decode rows and short chunks in a mixed step, pages of 16,
int4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longserve.kv.cache import KVCache
from longserve.ops.triton.kv import prefill_config

use_kernels = True  # False runs the torch reference on CUDA too (the oracle in tests)
TMA_QUERIES = prefill_config()["BM"]  # queries of one TMA prefill CTA


@dataclass
class AttnMeta:
    """Where each sequence's queries sit in the flat batch and where its KV lives."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    query_start: list[int]  # [B + 1] offsets of each sequence's queries in the batch
    context_lens: list[int]  # [B] tokens in the cache after this step, per sequence
    block_tables: list[torch.Tensor]  # [B] block ids of each sequence
    # the same, as tensors for the kernels (the runner builds them once per step on CUDA)
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32, rows padded with 0
    seq_lens: torch.Tensor | None = None  # [B] int32, context_lens
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32, query_start
    max_query_len: int = 0
    max_seq_len: int = 0  # a bound on seq_lens (max_model_len under a CUDA graph)
    # sequences bringing TMA_QUERIES queries or more: how many, and whether each is a whole
    # prompt (its queries are its whole context so far)
    long_queries: int = 0
    long_whole: bool = False


def attention(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttnMeta,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> output [T, Hq, D]; keys and values come from the cache, where the step's
    new k, v [T, Hkv, D] were just written (given, a whole-prompt step may read them directly)."""
    half = q.dtype in (torch.bfloat16, torch.float16)
    if use_kernels and meta.block_table is not None and q.is_cuda and half:
        from longserve.ops import triton as kernels

        kv = kernels.paged_kv(cache, layer)
        if meta.max_query_len == 1:
            return kernels.paged_decode(
                q, kv, meta.block_table, meta.seq_lens, scale, meta.max_seq_len
            )
        pages = (meta.block_table, meta.seq_lens)
        rows = (meta.cu_seqlens_q, meta.max_query_len, scale)
        out = None
        if meta.long_queries:
            if meta.long_whole and k is not None and kernels.reads_new_kv(q, kv, k, v):
                out = kernels.causal_prefill(q, k, v, *rows, at_least=TMA_QUERIES)
            elif kernels.reads_pages(q, kv):
                out = kernels.paged_prefill(q, kv, *pages, *rows, at_least=TMA_QUERIES)
        if out is None:
            return kernels.paged_extend(q, kv, *pages, *rows)
        if meta.long_queries < len(meta.context_lens):
            kernels.paged_extend(q, kv, *pages, *rows, out=out, fewer_than=TMA_QUERIES)
        return out
    out = torch.empty_like(q)
    group = q.shape[1] // cache.num_kv_heads
    for i, ctx in enumerate(meta.context_lens):
        s, e = meta.query_start[i], meta.query_start[i + 1]
        n = e - s
        k, v = cache.gather(layer, meta.block_tables[i], ctx, q.dtype)
        # [1, heads, tokens, D]: SDPA's fused kernels take 4-D inputs and no GQA
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        if n == 1:  # a decode token: a KV head's query heads attend as G queries, no copy
            qi = q[s].view(1, cache.num_kv_heads, group, -1)
            o = F.scaled_dot_product_attention(qi, k, v, scale=scale)
            out[s] = o.reshape(q.shape[1:])
            continue
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        qi = q[s:e].transpose(0, 1).unsqueeze(0)
        if n == ctx:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out

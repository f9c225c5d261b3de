"""Turns a scheduled batch into flat tensors, runs the model once, and samples.

All sequences of a step go through the model together as one flat batch of tokens; only the
rows that need logits (the last token of a sequence that reached its end, and prompt positions
whose logprobs were asked for) go through the lm_head.

On CUDA the step also carries its block tables, lengths and query offsets as tensors for the
Triton kernels, and decode steps (one new token per sequence) replay a CUDA graph captured at
the next batch size up in GRAPH_BATCH_SIZES: a decode step of a small model is otherwise
mostly kernel-launch time. Padding rows of a graph batch write nowhere (slot -1) and attend to
nothing (length 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.engine.request import Request
from longserve.engine.sampling import Logprob, Sample, sample, top_logprobs
from longserve.kv.cache import KVCache
from longserve.models.llama import CausalLM
from longserve.ops.attention import TMA_QUERIES, AttnMeta

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class StepResult:
    samples: dict[str, Sample]  # request_id -> sampled token, for requests that reached their end
    prompt_logprobs: dict[str, list[dict[int, Logprob]]]  # request_id -> entries for this chunk


class DecodeGraphs:
    """CUDA graphs of one model's decode step, one per batch size, replayed on fresh inputs.

    Under tensor parallelism every rank holds one of these over its own shard, captured in the
    same order so that the all-reduces inside line up, and replays it when rank 0 does.
    """

    def __init__(self, model: CausalLM, kv: KVCache, max_model_len: int, sizes: list[int]) -> None:
        self.model, self.kv, self.max_model_len = model, kv, max_model_len
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(sizes)

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        """Largest first, sharing one memory pool and the inputs."""
        n, width = sizes[-1], -(-self.max_model_len // self.kv.block_size)
        dev = self.kv.k[0].device
        self.g_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.g_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.g_table = torch.zeros(n, width, dtype=torch.int32, device=dev)
        cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        pool = None
        for b in reversed(sizes):
            meta = AttnMeta(
                slot_mapping=self.g_slots[:b],
                query_start=list(range(b + 1)),
                context_lens=[0] * b,
                block_tables=[],
                block_table=self.g_table[:b],
                seq_lens=self.g_lens[:b],
                cu_seqlens_q=cu[: b + 1],
                max_query_len=1,
                max_seq_len=self.max_model_len,
            )
            args = (self.g_ids[:b], self.g_pos[:b], self.kv, meta)
            self.model(*args)  # compiles the kernels outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(*args)
            pool = graph.pool()
            self.graphs[b] = (graph, out)

    def release(self) -> None:
        """Free the graphs. Under TP this must precede destroying the NCCL group: a captured
        collective otherwise keeps ncclCommDestroy waiting forever (pytorch/pytorch#115388)."""
        torch.cuda.synchronize(self.kv.k[0].device)
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def size_for(self, n: int, meta: AttnMeta) -> int | None:
        """The captured batch size a step of n sequences replays at; None if none fits it."""
        if meta.max_query_len != 1:
            return None
        return min((s for s in self.graphs if s >= n), default=None)

    def replay(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        n = ids.shape[0]
        b = self.size_for(n, meta)
        graph, out = self.graphs[b]
        self.g_ids[:n].copy_(ids)
        self.g_pos[:n].copy_(pos)
        self.g_slots[:n].copy_(meta.slot_mapping)
        self.g_slots[n:b].fill_(-1)
        self.g_lens[:n].copy_(meta.seq_lens)
        self.g_lens[n:b].fill_(0)
        self.g_table[:n, : meta.block_table.shape[1]].copy_(meta.block_table)
        graph.replay()
        return out[:n]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv: KVCache,
        device: torch.device,
        max_model_len: int = 0,
        max_num_seqs: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        """cuda_graphs: capture decode steps up to max_num_seqs sequences of max_model_len.

        model is the model itself or, under tensor parallelism, rank 0's TPDriver, whose
        decode_graphs has every rank capture its own.
        """
        self.model, self.kv, self.device = model, kv, device
        self.block_size = kv.block_size
        self.max_model_len = max_model_len
        self.graphs = None
        if cuda_graphs:
            sizes = [b for b in GRAPH_BATCH_SIZES if b < 2 * max_num_seqs]
            make = getattr(model, "decode_graphs", None) or (lambda *a: DecodeGraphs(model, *a))
            self.graphs = make(kv, max_model_len, sizes)

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttnMeta) -> torch.Tensor | None:
        """Run a decode step through its graph; None when no graph fits it."""
        if self.graphs is None or self.graphs.size_for(ids.shape[0], meta) is None:
            return None
        return self.graphs.replay(ids, pos, meta)

    def _slots(self, req: Request, start: int, n: int) -> list[int]:
        bs, table = self.block_size, req.block_ids
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    @torch.inference_mode()
    def step(self, items: list[tuple[Request, int]]) -> StepResult:
        ids, pos, slots, qstart, ctx, tables = [], [], [], [0], [], []
        sample_rows, sample_reqs, plp_rows = [], [], []
        for req, n in items:
            s = req.num_computed_tokens
            ids += req.all_token_ids[s : s + n]
            pos += range(s, s + n)
            slots += self._slots(req, s, n)
            qstart.append(qstart[-1] + n)
            ctx.append(s + n)
            tables.append(req.block_ids[: -(-(s + n) // self.block_size)])
            if s + n == req.num_tokens:
                sample_rows.append(qstart[-1] - 1)
                sample_reqs.append(req)
            if req.prompt_logprobs is not None and len(req.prompt_logprobs) == s + 1:
                last = min(s + n, req.num_prompt_tokens - 1)
                if last > s:
                    plp_rows.append((req, qstart[-2], s, last))
        dev = self.device
        meta = AttnMeta(torch.tensor(slots, dtype=torch.long, device=dev), qstart, ctx, [])
        long = [c == n for c, (_, n) in zip(ctx, items, strict=True) if n >= TMA_QUERIES]
        meta.long_queries, meta.long_whole = len(long), all(long)
        if dev.type == "cuda":  # one padded table; the reference's per-sequence tables view it
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            meta.block_table = torch.tensor(padded, dtype=torch.int32, device=dev)
            meta.block_tables = [meta.block_table[i, : len(t)] for i, t in enumerate(tables)]
            meta.seq_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
            meta.cu_seqlens_q = torch.tensor(qstart, dtype=torch.int32, device=dev)
            meta.max_query_len = max(n for _, n in items)
            meta.max_seq_len = max(ctx)
        else:
            meta.block_tables = [torch.tensor(t, dtype=torch.long, device=dev) for t in tables]
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        hidden = self._replay(ids_t, pos_t, meta)
        if hidden is None:
            hidden = self.model(ids_t, pos_t, self.kv, meta)
        samples = {}
        if sample_reqs:
            logits = self.model.logits(hidden[sample_rows])
            params = [r.params for r in sample_reqs]
            out = sample(logits, params, [r.generator for r in sample_reqs])
            samples = {r.request_id: s for r, s in zip(sample_reqs, out, strict=True)}
        plp = {}
        for req, row0, s, last in plp_rows:
            logp = self.model.logits(hidden[row0 : row0 + last - s]).log_softmax(-1)
            targets = req.prompt_token_ids[s + 1 : last + 1]
            k = req.params.prompt_logprobs
            plp[req.request_id] = [
                top_logprobs(lp, t, k) for lp, t in zip(logp, targets, strict=True)
            ]
        return StepResult(samples, plp)

"""Turns a scheduled batch into flat tensors, runs the model once, and samples.

All sequences of a step go through the model together as one flat batch of tokens; only the
rows that need logits (the last token of a sequence that reached its end, and prompt positions
whose logprobs were asked for) go through the lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.engine.request import Request
from longserve.engine.sampling import Logprob, Sample, sample, top_logprobs
from longserve.kv.cache import KVCache
from longserve.models.llama import CausalLM
from longserve.ops.attention import AttnMeta


@dataclass
class StepResult:
    samples: dict[str, Sample]  # request_id -> sampled token, for requests that reached their end
    prompt_logprobs: dict[str, list[dict[int, Logprob]]]  # request_id -> entries for this chunk


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.block_size = kv.block_size

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
        meta = AttnMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start=qstart,
            context_lens=ctx,
            block_tables=[torch.tensor(t, dtype=torch.long, device=dev) for t in tables],
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.kv,
            meta,
        )
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

"""Rank 0 drives, the other ranks follow: every model call is broadcast, then run on every rank.

Rank 0's ModelRunner holds a TPDriver where it would hold the model; the driver broadcasts the
call's tensors (input ids, positions, attention metadata; or the hidden rows that need logits)
and then runs its own shard, while ranks > 0 sit in serve() running the same call on theirs.
The collectives inside the model (one all-reduce per attention and per MLP block) then line up
across ranks by construction. Scheduling, sampling and the block tables stay on rank 0.
On CUDA every rank captures the same decode graphs (all-reduces inside) when rank 0 does, and
replays its own when rank 0 broadcasts a step's inputs.
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.distributed as dist

from longserve.dist.group import TPGroup, broadcast
from longserve.engine.runner import DecodeGraphs
from longserve.kv.cache import KVCache
from longserve.models.llama import CausalLM
from longserve.ops.attention import AttnMeta


def gather_logits(
    model: CausalLM, hidden: torch.Tensor, tp: TPGroup, vocab_size: int
) -> torch.Tensor:
    """hidden [R, H] -> float logits [R, V]: each rank's vocab slice, gathered on every rank."""
    local = model.logits(hidden).contiguous()
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=-1)[:, :vocab_size]


class TPDriver:
    """Rank 0's stand-in for the model in ModelRunner: the same two calls, run on every rank."""

    def __init__(self, model: CausalLM, tp: TPGroup) -> None:
        self.model, self.tp = model, tp

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttnMeta
    ) -> torch.Tensor:
        broadcast(("forward", (input_ids, positions, meta)), self.tp)
        return self.model(input_ids, positions, kv, meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        broadcast(("logits", (hidden,)), self.tp)
        return gather_logits(self.model, hidden, self.tp, self.model.cfg.vocab_size)

    def decode_graphs(self, kv: KVCache, max_model_len: int, sizes: list[int]) -> TPGraphs:
        """Every rank captures the same decode graphs over its shard, collectives inside."""
        broadcast(("graphs", (max_model_len, sizes)), self.tp)
        local = DecodeGraphs(self.model, kv, max_model_len, sizes)
        self.tp.before_close.append(local.release)
        return TPGraphs(local, self.tp)


class TPGraphs:
    """Rank 0's decode graphs: each replay is broadcast first, so every rank replays its own."""

    def __init__(self, local: DecodeGraphs, tp: TPGroup) -> None:
        self.local, self.tp = local, tp

    def size_for(self, n: int, meta: AttnMeta) -> int | None:
        return self.local.size_for(n, meta)

    def replay(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        broadcast(("replay", (ids, pos, meta)), self.tp)
        return self.local.replay(ids, pos, meta)


@torch.inference_mode()
def serve(model: CausalLM, kv: KVCache, tp: TPGroup) -> None:
    """A rank > 0: run each call rank 0 broadcasts on this rank's shard and KV, until "stop"."""
    graphs = None
    while True:
        op, args = broadcast(None, tp)
        if op == "forward":
            input_ids, positions, meta = args
            model(input_ids, positions, kv, meta)
        elif op == "replay":
            graphs.replay(*args)
        elif op == "graphs":
            graphs = DecodeGraphs(model, kv, *args)
            tp.before_close.append(graphs.release)
        elif op == "logits":
            gather_logits(model, args[0], tp, model.cfg.vocab_size)
        elif op == "stop":
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel call {op!r}")


def run_worker(model: CausalLM, kv: KVCache, tp: TPGroup) -> NoReturn:
    """The rest of a rank > 0's life: serve, leave the group, end the process."""
    serve(model, kv, tp)
    tp.shutdown()
    raise SystemExit(0)

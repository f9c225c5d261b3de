"""The tensor-parallel group: joining it, the local worker processes, and rank 0's broadcasts.

One process per rank, one torch.distributed process group over all of them: NCCL on GPUs, gloo
on the CPU. Rank 0 is the engine the user holds; it either spawns the other ranks on this host
(the default) or finds itself launched by torchrun with the others (several hosts). Every rank
then builds the same LLMEngine; on ranks other than 0 that constructor never returns, it serves
the model steps rank 0 broadcasts (longserve.dist.worker).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longserve.config import EngineConfig, ModelConfig

log = logging.getLogger("longserve")


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    workers: list = field(default_factory=list)  # worker processes rank 0 spawned on this host
    kv_layout: list[dict] = field(default_factory=list)  # per rank: its KV heads and blocks
    before_close: list[Callable[[], None]] = field(default_factory=list)  # e.g. free CUDA graphs
    closed: bool = False

    def agree_kv(self, num_blocks: int, cfg: ModelConfig, block_bytes: int) -> int:
        """The number of KV blocks every rank can hold (the scheduler's one pool spans them all).

        Also records each rank's KV heads and block size in kv_layout, for the log and tests.
        """
        from longserve.dist.shard import head_ranges

        kv = head_ranges(cfg, self.rank, self.size)[1]
        mine = {"rank": self.rank, "kv_heads": (kv.start, kv.stop), "blocks": num_blocks}
        mine["block_bytes"] = block_bytes
        layout: list[Any] = [None] * self.size
        dist.all_gather_object(layout, mine)
        n = min(x["blocks"] for x in layout)
        self.kv_layout = [dict(x, blocks=n) for x in layout]
        return n

    def shutdown(self) -> None:
        """Rank 0: stop the other ranks and leave the group. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        if self.rank == 0 and all(p.is_alive() for p in self.workers):
            with contextlib.suppress(RuntimeError):  # a rank that failed has left already
                broadcast(("stop", ()), self)
        for p in self.workers:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        for release in self.before_close:
            release()
        _destroy_group()


def _destroy_group(timeout_s: float = 30.0) -> None:
    """destroy_process_group, given up after timeout_s: NCCL teardown can hang (a graph still
    holding captured work, pytorch/pytorch#115388), and an engine's exit must not hang with it."""
    t = threading.Thread(target=dist.destroy_process_group, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("the process group did not close within %.0f s; leaving it", timeout_s)


def join(cfg: EngineConfig) -> TPGroup | None:
    """Join (or, on rank 0, start) the group of cfg.tensor_parallel_size ranks; None for one rank."""
    size = cfg.tensor_parallel_size
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return None
    cuda = cfg.torch_device.type == "cuda"
    if cuda and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", size)):
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} GPUs on this host;"
            f" {torch.cuda.device_count()} are visible (use torchrun for several hosts)"
        )
    if dist.is_initialized():
        raise ValueError("a process group is running already: one tensor-parallel engine at a time")
    from longserve.dist.shard import head_ranges
    from longserve.plan.cost import load_config

    head_ranges(load_config(cfg.model), 0, size)  # a split the heads refuse fails before spawning
    workers, init = [], "env://"
    if "RANK" in os.environ:  # torchrun, or a worker this module spawned
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"launched with WORLD_SIZE={world} but tensor_parallel_size={size}")
    else:
        rank, port = 0, _free_port()
        init = f"tcp://127.0.0.1:{port}"
        ctx = mp.get_context("spawn")  # fork is unsafe once torch's threads or CUDA started
        for r in range(1, size):
            p = ctx.Process(target=_worker_main, args=(r, size, port, cfg), daemon=True)
            p.start()
            workers.append(p)
    tp = _group(rank, size, cuda)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init,
        rank=rank,
        world_size=size,
        device_id=tp.device if cuda else None,
    )
    tp.workers = workers
    if rank == 0:
        atexit.register(tp.shutdown)
    return tp


def _group(rank: int, size: int, cuda: bool) -> TPGroup:
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return TPGroup(rank, size, device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, size: int, port: int, cfg: EngineConfig) -> None:
    """A spawned rank: the same environment torchrun would give it, then the same engine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(size),
    )
    if cfg.torch_device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    from longserve.engine.llm import LLMEngine

    LLMEngine(cfg)  # serves rank 0's steps, then exits the process


@contextlib.contextmanager
def rank0_first(tp: TPGroup | None) -> Iterator[None]:
    """Rank 0 runs the block before the others: it writes the caches the others then read."""
    if tp is not None and tp.rank != 0:
        dist.barrier()
    yield
    if tp is not None and tp.rank == 0:
        dist.barrier()


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in a broadcast object: its bytes in the buffer, shape and dtype."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


@dataclass(frozen=True)
class _Fields:
    """A dataclass instance in a broadcast object: its type and its fields."""

    cls: type
    values: dict[str, Any]


def broadcast(obj: Any, tp: TPGroup) -> Any:
    """Send obj from rank 0 to every rank (the others pass None and get it back).

    obj may nest tuples, lists, dicts and dataclasses (AttnMeta) around tensors: the structure
    travels pickled, the tensors as one byte buffer in one collective on the group's device.
    """
    box: list[Any] = [None]
    if tp.rank == 0:
        skeleton, buf = pack(obj, tp.device)
        box = [(skeleton, buf.numel())]
    dist.broadcast_object_list(box, src=0, device=tp.device)
    skeleton, nbytes = box[0]
    if tp.rank != 0:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=tp.device)
    if nbytes:
        dist.broadcast(buf, src=0)
    return obj if tp.rank == 0 else unpack(skeleton, buf)


def pack(obj: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """obj's structure with each tensor replaced by a slot, and the tensors' bytes on device."""
    packed: list[tuple[int, torch.Tensor]] = []
    skeleton = _strip(obj, packed)
    buf = torch.empty(_end(packed), dtype=torch.uint8, device=device)
    for offset, t in packed:
        buf[offset : offset + _nbytes(t)].copy_(t.reshape(-1).view(torch.uint8))
    return skeleton, buf


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _end(packed: list[tuple[int, torch.Tensor]]) -> int:
    return packed[-1][0] + _nbytes(packed[-1][1]) if packed else 0


def _strip(obj: Any, packed: list[tuple[int, torch.Tensor]]) -> Any:
    """The structure with each tensor replaced by its slot (16-byte aligned, for any dtype)."""
    if isinstance(obj, torch.Tensor):
        offset = -(-_end(packed) // 16) * 16
        packed.append((offset, obj))
        cpu = obj.device.type == "cpu"
        return _Slot(offset, _nbytes(obj), tuple(obj.shape), obj.dtype, cpu)
    if is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: _strip(getattr(obj, f.name), packed) for f in fields(obj)}
        return _Fields(type(obj), values)
    if isinstance(obj, list | tuple):
        return type(obj)(_strip(x, packed) for x in obj)
    if isinstance(obj, dict):
        return {k: _strip(v, packed) for k, v in obj.items()}
    return obj


def unpack(skeleton: Any, buf: torch.Tensor) -> Any:
    """The object pack() took apart: tensors are views of buf (copied back to the CPU if there)."""
    if isinstance(skeleton, _Slot):
        t = buf[skeleton.offset : skeleton.offset + skeleton.nbytes].view(skeleton.dtype)
        t = t.view(skeleton.shape)
        return t.cpu() if skeleton.on_cpu else t
    if isinstance(skeleton, _Fields):
        out = object.__new__(skeleton.cls)
        for k, v in skeleton.values.items():
            object.__setattr__(out, k, unpack(v, buf))
        return out
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(unpack(x, buf) for x in skeleton)
    if isinstance(skeleton, dict):
        return {k: unpack(v, buf) for k, v in skeleton.items()}
    return skeleton

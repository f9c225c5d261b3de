"""The GPU table the planner prices against: datasheet peaks, and ceilings measured on a real part.

Units: memory in GB (10^9 bytes, as datasheets count), bandwidth in TB/s (10^12 bytes/s), tensor
rates in dense TFLOP/s (datasheets print the 2:4-sparse rate; the dense one is half of it).
A datasheet entry reads weights and KV at the same HBM peak and runs prefill attention at the
bf16 rate; a measured entry carries what each path reached. To add a GPU, add a row here or pass
the planner a JSON file with the same fields.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from longserve.ops.triton.kv import MIN_TMA_PAGE


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_gb: float  # capacity
    weight_read_tbps: float  # streaming weights in a decode GEMV
    kv_read_tbps: float  # streaming KV in decode attention
    bf16_tflops: float  # dense bf16 matmul
    fp8_tflops: float  # dense fp8 matmul
    attention_tflops: float  # causal prefill attention
    measured: bool  # True: achieved ceilings (efficiency 1 by default); False: datasheet peaks
    source: str


@dataclass(frozen=True)
class Efficiency:
    """Fraction of a GPU entry's rate that a path reaches, and the fixed cost of a decode step.

    kv_read prices bf16/fp16 KV; kv_read_fp8 and kv_read_int4 the quantized formats, whose
    dequantizing kernels need not reach the bandwidth the plain one does (all three measured on
    the Gluon decode kernel, which takes every format in every power-of-two page size for heads
    of 64 or 128 channels and int4 groups of 64: kv.py's warp_decode_serves). Prefill attention
    likewise: attention over bf16/fp16 (and int4, not measured apart) KV, attention_fp8 over fp8
    KV, and attention_tma / attention_tma_fp8 in pages of MIN_TMA_PAGE tokens or more, where the
    engine's chunks read their context by TMA. step_overhead_ms
    (plus step_overhead_ms_per_seq for each sequence in the batch) is the host's share of a
    decode step: scheduling, input tensors, sampling and launches that the GPU waits on.
    """

    weight_read: float = 1.0
    kv_read: float = 1.0
    kv_read_fp8: float = 1.0
    kv_read_int4: float = 1.0
    matmul_bf16: float = 1.0
    matmul_fp8: float = 1.0
    attention: float = 1.0
    attention_fp8: float = 1.0
    attention_tma: float = 1.0
    attention_tma_fp8: float = 1.0
    step_overhead_ms: float = 0.0
    step_overhead_ms_per_seq: float = 0.0

    def kv_read_for(self, kv: str) -> float:
        """The decode KV read efficiency of a KV format name (fp8_e4m3, int4, bf16, ...)."""
        if kv.startswith("fp8"):
            return self.kv_read_fp8
        return self.kv_read_int4 if kv == "int4" else self.kv_read

    def attention_for(self, kv: str, block_size: int) -> float:
        """The prefill attention efficiency of a KV format name in pages of block_size tokens."""
        tma = block_size >= MIN_TMA_PAGE and kv != "int4"
        if kv.startswith("fp8"):
            return self.attention_tma_fp8 if tma else self.attention_fp8
        return self.attention_tma if tma else self.attention


def datasheet(
    name: str, hbm_gb: float, hbm_tbps: float, bf16: float, fp8: float, source: str
) -> GPU:
    return GPU(name, hbm_gb, hbm_tbps, hbm_tbps, bf16, fp8, bf16, False, source)


GPUS = {
    g.name: g
    for g in [
        datasheet(
            "h100-sxm",
            80,
            3.35,
            1979 / 2,
            3958 / 2,
            "NVIDIA H100 Tensor Core GPU datasheet, SXM column (sparse tensor rates halved)",
        ),
        datasheet(
            "h200-sxm",
            141,
            4.8,
            1979 / 2,
            3958 / 2,
            "NVIDIA H200 Tensor Core GPU datasheet, SXM column (sparse tensor rates halved)",
        ),
        GPU(
            "h200-measured",
            hbm_gb=141,
            weight_read_tbps=3.78,
            kv_read_tbps=3.63,
            bf16_tflops=775,
            fp8_tflops=1372,
            attention_tflops=558,
            measured=True,
            source="shared/GPU.md, one H200, 2026-11-29: bf16 GEMV 57344x8192 batch 1; SDPA decode"
            " bf16 KV 128K batch 1; bf16 and fp8 GEMM 8192^3; SDPA causal prefill 128K (cuDNN)."
            " Capacity from the datasheet.",
        ),
    ]
}

# Efficiencies a datasheet entry gets by default: what the H200 reached over what it promises.
_SEEN, _PEAK = GPUS["h200-measured"], GPUS["h200-sxm"]
_KV_SEEN = _SEEN.kv_read_tbps / _PEAK.kv_read_tbps
MEASURED_EFFICIENCY = Efficiency(
    weight_read=_SEEN.weight_read_tbps / _PEAK.weight_read_tbps,
    kv_read=_KV_SEEN,
    kv_read_fp8=_KV_SEEN,
    kv_read_int4=_KV_SEEN,
    matmul_bf16=_SEEN.bf16_tflops / _PEAK.bf16_tflops,
    matmul_fp8=_SEEN.fp8_tflops / _PEAK.fp8_tflops,
    **{
        f: _SEEN.attention_tflops / _PEAK.attention_tflops
        for f in ("attention", "attention_fp8", "attention_tma", "attention_tma_fp8")
    },
)

# This engine against the measured ceilings, fitted by benchmarks/calibrate_planner.py from its
# own H200 runs: its kernels' rates and its per-step host cost (docs/planning.md).
ENGINE_CALIBRATION = Path(__file__).parent.parent / "data" / "engine_h200.json"
_RATES = [f.name for f in fields(Efficiency) if not f.name.startswith("step_overhead")]


@functools.cache
def engine_efficiency() -> Efficiency:
    """The engine's calibration (efficiencies over the measured ceilings, step overheads)."""
    return Efficiency(**json.loads(ENGINE_CALIBRATION.read_text())["efficiency"])


def default_efficiency(gpu: GPU, engine: bool = True) -> Efficiency:
    """What a plan prices at unless told otherwise.

    Ceilings: a measured entry runs at them (1); a datasheet one is derated as the H200 measured.
    engine=True then applies this engine's calibration on top: its kernels' share of those
    ceilings and its per-step host overhead. engine=False prices the hardware alone.
    """
    ceil = Efficiency() if gpu.measured else MEASURED_EFFICIENCY
    if not engine:
        return ceil
    eng = engine_efficiency()
    rates = {k: getattr(ceil, k) * getattr(eng, k) for k in _RATES}
    return replace(eng, **rates)


def get_gpu(name: str) -> GPU:
    """A table name, or a JSON file holding a GPU's fields."""
    if name.lower() in GPUS:
        return GPUS[name.lower()]
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        d = json.loads(path.read_text())
        names = [f.name for f in fields(GPU)]
        if set(d) != set(names):
            raise ValueError(f"{path}: a GPU file holds exactly the fields {', '.join(names)}")
        return GPU(**d)
    raise ValueError(f"unknown GPU {name!r}: use {', '.join(GPUS)} or a JSON file of GPU fields")

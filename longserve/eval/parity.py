"""Parity of engine recipes against a reference, with a noise floor (the lecture's protocol).

The reference recipe runs twice on RULER with two data seeds: the gap between those two runs at
each length is the noise floor, what a change of samples alone moves the score. Every other
recipe runs on the first seed; its delta from the reference is flagged where |delta| exceeds the
floor. A recipe is a named set of EngineConfig overrides:

    auto                       the reference engine as configured on the command line
    fp8_e4m3:per_head          kv_cache_dtype[:kv_scale]
    chunked_off, prefix_off    enable_chunked_prefill / enable_prefix_caching False (and *_on)
    key=value[,key=value]      any EngineConfig fields (values parsed as JSON where they parse)
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from longserve.config import EngineConfig
from longserve.eval import ruler

KV_DTYPES = ("auto", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int4")
SWITCHES = {
    "chunked_on": {"enable_chunked_prefill": True},
    "chunked_off": {"enable_chunked_prefill": False},
    "prefix_on": {"enable_prefix_caching": True},
    "prefix_off": {"enable_prefix_caching": False},
}


@dataclass
class Recipe:
    name: str
    overrides: dict


def parse_recipe(spec: str) -> Recipe:
    spec = spec.strip()
    if spec in SWITCHES:
        return Recipe(spec, dict(SWITCHES[spec]))
    dtype, _, scale = spec.partition(":")
    if dtype in KV_DTYPES and "=" not in spec:
        over = {} if dtype == "auto" else {"kv_cache_dtype": dtype}
        if scale:
            over["kv_scale"] = scale
        return Recipe(spec, over)
    over = {}
    for item in spec.split(","):
        k, eq, v = item.partition("=")
        if not eq or k not in EngineConfig.field_names():
            raise ValueError(
                f"bad recipe {spec!r}: use a KV format (fp8_e4m3:per_head), "
                f"{', '.join(SWITCHES)}, or field=value pairs of EngineConfig"
            )
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return Recipe(spec, over)


@dataclass
class Run:
    recipe: str
    seed: int
    result: ruler.Result
    load_s: float


def run(
    base: EngineConfig,
    recipes: Sequence[Recipe],
    tasks: Sequence[ruler.Task],
    lengths: Sequence[int],
    samples: int,
    seed: int = 42,
    progress: bool = True,
) -> dict:
    """Reference twice (seeds seed and seed+1), then each recipe once; deltas and flags."""
    from longserve import LLM

    def one(cfg: EngineConfig, name: str, seeds: Sequence[int]) -> list[Run]:
        t0 = time.perf_counter()
        llm = LLM(**vars(cfg))
        load = time.perf_counter() - t0
        runs = [
            Run(name, s, ruler.run(llm, tasks, lengths, samples, s, progress), round(load, 2))
            for s in seeds
        ]
        del llm
        gc.collect()
        return runs

    ref_a, ref_b = one(base, "reference", [seed, seed + 1])
    noise = {n: round(abs(ref_a.result.average[n] - ref_b.result.average[n]), 2) for n in lengths}
    rows = []
    for r in recipes:
        (got,) = one(replace(base, **r.overrides), r.name, [seed])
        delta = {n: round(got.result.average[n] - ref_a.result.average[n], 2) for n in lengths}
        rows.append(
            dict(
                recipe=r.name,
                overrides=r.overrides,
                average=got.result.average,
                delta=delta,
                flagged={n: abs(delta[n]) > noise[n] for n in lengths},
                scores=got.result.scores,
                wall_s=got.result.wall_s,
                samples_per_s=got.result.samples_per_s,
            )
        )
    return dict(
        tasks=[t.name for t in tasks],
        lengths=list(lengths),
        samples_per_task=samples,
        seeds=[seed, seed + 1],
        reference=dict(
            average=ref_a.result.average,
            average_seed2=ref_b.result.average,
            scores=ref_a.result.scores,
            wall_s=ref_a.result.wall_s,
            samples_per_s=ref_a.result.samples_per_s,
        ),
        noise_floor=noise,
        recipes=rows,
    )


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(report: dict) -> str:
    """Recipes as rows: score (delta) per length, flagged past the noise floor."""
    lengths = report["lengths"]
    ref = report["reference"]
    head = "| recipe | " + " | ".join(_k(n) for n in lengths) + " | samples/s |"
    rows = [head, "|---" * (len(lengths) + 2) + "|"]
    rate = sum(ref["samples_per_s"].values()) / len(lengths)
    rows.append(
        "| reference (seed A) | "
        + " | ".join(f"{ref['average'][n]:.1f}" for n in lengths)
        + f" | {rate:.3f} |"
    )
    rows.append(
        "| reference (seed B) | "
        + " | ".join(f"{ref['average_seed2'][n]:.1f}" for n in lengths)
        + " | |"
    )
    rows.append(
        "| noise floor \\|A-B\\| | "
        + " | ".join(f"{report['noise_floor'][n]:.1f}" for n in lengths)
        + " | |"
    )
    for r in report["recipes"]:
        cells = [
            f"{r['average'][n]:.1f} ({r['delta'][n]:+.1f}){' **!**' if r['flagged'][n] else ''}"
            for n in lengths
        ]
        rate = sum(r["samples_per_s"].values()) / len(lengths)
        rows.append(f"| {r['recipe']} | " + " | ".join(cells) + f" | {rate:.3f} |")
    return "\n".join(rows)

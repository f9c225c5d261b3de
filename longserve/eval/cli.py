"""`longserve eval ruler|niah|parity`: long-context evaluation through the offline engine."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_LENGTHS = "1024,2048,4096"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def register(sub: argparse._SubParsersAction) -> None:
    from longserve.cli import add_engine_args

    p = sub.add_parser(
        "eval",
        help="long-context evaluation: RULER, needle in a haystack, recipe parity",
        description="Long-context evaluation through the offline engine, batched.",
    )
    ev = p.add_subparsers(dest="eval_command", required=True)

    def common(q: argparse.ArgumentParser, out: str) -> None:
        q.add_argument(
            "--lengths",
            type=_ints,
            default=_ints(DEFAULT_LENGTHS),
            help="target lengths in tokens (prompt + new tokens), comma-separated",
        )
        q.add_argument(
            "--samples", type=int, default=10, help="samples per task (or per grid cell) and length"
        )
        q.add_argument("--data-seed", type=int, default=42, help="seed of the generated samples")
        q.add_argument(
            "--out", default=out, help="JSON result path; predictions go beside it (.jsonl)"
        )
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_engine_args(q)

    r = ev.add_parser(
        "ruler",
        help="RULER's synthetic tasks",
        description="RULER's synthetic tasks at each length; per-task and average scores.",
    )
    r.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    common(r, "ruler.json")
    r.set_defaults(func=cmd_ruler)

    n = ev.add_parser(
        "niah",
        help="needle-in-a-haystack grid and heatmap",
        description="Context length x depth grid with an exact-match needle; writes a heatmap PNG.",
    )
    n.add_argument(
        "--depths",
        type=_floats,
        default=[float(d) for d in range(0, 101, 10)],
        help="needle depths in percent, comma-separated",
    )
    common(n, "niah.json")
    n.set_defaults(func=cmd_niah, samples=1)

    q = ev.add_parser(
        "parity",
        help="recipes against the reference, with a noise floor",
        description="The reference twice (two data seeds) for the noise floor, then each recipe; deltas per length.",
    )
    q.add_argument(
        "--recipes",
        default="chunked_off,prefix_off",
        help="comma-separated... use ';' between recipes that hold commas (see longserve/eval/parity.py)",
    )
    q.add_argument(
        "--tasks",
        default="niah_single_1,niah_single_2,niah_multivalue,vt",
        help="RULER tasks to average",
    )
    common(q, "parity.json")
    q.set_defaults(func=cmd_parity, samples=5)


def _engine(args: argparse.Namespace):
    from longserve.cli import engine_config

    cfg = engine_config(args)
    if args.max_model_len is None:  # room for the longest sample, past the window on purpose
        cfg.max_model_len = max(args.lengths)
    return cfg


def _meta(args: argparse.Namespace, cfg) -> dict:
    import torch
    import transformers

    device = cfg.torch_device
    return dict(
        command="longserve " + shlex.join(sys.argv[1:]),
        engine={k: v for k, v in asdict(cfg).items()},
        dtype=str(cfg.torch_dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
        ),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _write(out: str, report: dict, records: list[dict] | None = None) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    if records is not None:
        with path.with_suffix(".jsonl").open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def cmd_ruler(args: argparse.Namespace) -> int:
    from longserve import LLM
    from longserve.eval import ruler

    tasks = ruler.select_tasks(args.tasks)
    cfg = _engine(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(cfg))
    load = time.perf_counter() - t0
    res = ruler.run(llm, tasks, args.lengths, args.samples, args.data_seed, not args.no_progress)
    report = dict(
        suite="ruler",
        **_meta(args, cfg),
        load_s=round(load, 2),
        data_seed=args.data_seed,
        tasks=[t.name for t in tasks],
        lengths=args.lengths,
        **res.to_json(),
    )
    report["markdown"] = ruler.markdown(res, args.lengths)
    _write(args.out, report, res.records)
    print(report["markdown"])
    return 0


def cmd_niah(args: argparse.Namespace) -> int:
    from longserve import LLM
    from longserve.eval import niah

    cfg = _engine(args)
    llm = LLM(**vars(cfg))
    grid = niah.run(
        llm, args.lengths, args.depths, args.samples, args.data_seed, not args.no_progress
    )
    report = dict(
        suite="niah",
        **_meta(args, cfg),
        data_seed=args.data_seed,
        **{k: v for k, v in asdict(grid).items() if k != "records"},
    )
    _write(args.out, report, grid.records)
    png = str(Path(args.out).with_suffix(".png"))
    rope = f", rope_scaling {json.dumps(cfg.rope_scaling)}" if cfg.rope_scaling else ""
    niah.heatmap(
        grid,
        png,
        f"Needle in a haystack: {cfg.model} ({report['dtype']}{rope}), {args.samples} sample(s) per cell",
    )
    print(f"wrote {png}", file=sys.stderr)
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from longserve.eval import parity, ruler

    sep = ";" if ";" in args.recipes else ","
    recipes = [parity.parse_recipe(s) for s in args.recipes.split(sep) if s.strip()]
    tasks = ruler.select_tasks(args.tasks)
    cfg = _engine(args)
    t0 = time.perf_counter()
    report = parity.run(
        cfg, recipes, tasks, args.lengths, args.samples, args.data_seed, not args.no_progress
    )
    report = dict(
        suite="parity",
        **_meta(args, cfg),
        wall_s_total=round(time.perf_counter() - t0, 1),
        **report,
    )
    report["markdown"] = parity.markdown(report)
    _write(args.out, report)
    Path(args.out).with_suffix(".md").write_text(report["markdown"] + "\n")
    print(report["markdown"])
    return 0

"""The report's pictures (matplotlib, headless): TTFT bars, p99 against chunk budget, parity
deltas with the noise-floor band, and predicted against measured."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ttft_bars(prefix: dict, path: Path) -> Path:
    """First and second turn TTFT, prefix cache on and off."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    modes = [m for m in ("cache_off", "cache_on") if m in prefix]
    xs = range(len(modes))
    w = 0.38
    first = [prefix[m]["first_ttft_s"] for m in modes]
    second = [prefix[m]["second_ttft_s"] for m in modes]
    b1 = ax.bar([x - w / 2 for x in xs], first, w, label="first turn")
    b2 = ax.bar([x + w / 2 for x in xs], second, w, label="second turn (same document)")
    ax.bar_label(b1, fmt="%.3g s", fontsize=8)
    ax.bar_label(b2, fmt="%.3g s", fontsize=8)
    ax.set_xticks(list(xs), [m.replace("_", " ") for m in modes])
    ax.set_ylabel("TTFT (s)")
    ax.set_title(
        f"TTFT: {prefix['doc_tokens']}-token document + {prefix['turn_tokens']}-token turn"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def p99_vs_budget(mixed: dict, path: Path) -> Path:
    """p99 TTFT of short and long requests for each chunk budget."""
    rows = mixed["rows"]
    labels = [str(r["budget"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, marker in (("short", "o"), ("long", "s")):
        ys = [r[f"{kind}_ttft_ms"].get("p99", float("nan")) for r in rows]
        ax.plot(
            labels, ys, marker=marker, label=f"{kind} prompts ({mixed[f'{kind}_tokens']} tokens)"
        )
    ax.set_yscale("log")
    ax.set_xlabel("chunk budget (max_num_batched_tokens[/per-prompt cap]; off = no chunking)")
    ax.set_ylabel("p99 TTFT (ms)")
    ax.set_title("Mixed traffic: 90% short, 10% long")
    ax.legend(fontsize=8)
    return _save(fig, path)


def parity_deltas(rows: list[dict], noise: dict[int, float], path: Path) -> Path:
    """Score delta against the reference per length, one line per recipe; grey band = noise floor.

    rows: {"recipe", "length", "delta"} with delta in points; noise: length -> floor in points.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lengths = sorted(noise)
    ax.fill_between(
        lengths,
        [-noise[n] for n in lengths],
        [noise[n] for n in lengths],
        color="0.85",
        label="noise floor (reference vs reference)",
    )
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        pts = sorted((r["length"], r["delta"]) for r in rows if r["recipe"] == recipe)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=recipe)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score delta vs reference (points)")
    ax.set_title("Parity of each recipe against the reference")
    ax.legend(fontsize=7)
    return _save(fig, path)


def predicted_vs_measured(rows: list[dict], path: Path) -> Path:
    """Bars of predicted and measured values per figure ({"name", "predicted", "measured"})."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(rows))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["predicted"] for r in rows], w, label="planner")
    ax.bar([x + w / 2 for x in xs], [r["measured"] for r in rows], w, label="measured")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Planner prediction against measurement")
    ax.legend(fontsize=8)
    return _save(fig, path)

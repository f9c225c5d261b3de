"""Needle in a haystack: a context length x depth grid, scored by exact match, drawn as a heatmap.

The haystack is the essay text; the needle is RULER's ("One of the special magic numbers for
{key} is: {value}.") placed at the sentence boundary nearest the requested depth, with RULER's
question and answer prefix, so that retrieval is scored by the 7-digit value appearing in the
answer (no LLM judge). Every cell at one length shares the same essay prefix, so the prefix cache
serves the text before the needle.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from longserve.eval import data
from longserve.eval.ruler import (
    NEEDLE,
    NIAH_PREFIX,
    NIAH_TEMPLATE,
    Built,
    chat_text,
    count_tokens,
    fit,
    singular,
)

MAX_NEW_TOKENS = 32


@dataclass
class Cell:
    length: int
    depth: float  # percent
    index: int
    prompt_token_ids: list[int]
    value: str
    needle_depth: float  # where the needle landed: share of the context's characters before it

    @property
    def total(self) -> int:
        return len(self.prompt_token_ids) + MAX_NEW_TOKENS


def place(text: str, needle: str, depth: float) -> tuple[str, float]:
    """Put the needle between the sentences at the boundary nearest depth (percent)."""
    sents = data.split_sentences(text)
    ends, pos = [0], 0
    for s in sents:
        pos += len(s) + 1
        ends.append(pos)
    target = depth / 100 * pos
    cut = min(range(len(ends)), key=lambda i: abs(ends[i] - target))
    context = " ".join([*sents[:cut], needle, *sents[cut:]])
    return context, context.index(needle) / len(context)


def build_cell(tok, length: int, depth: float, index: int, seed: int = 42) -> Cell:
    rng = random.Random(f"{seed}:niah:{index}")  # one key and value per sample row, any length
    key, value = data.random_value("words", rng), data.random_value("numbers", rng)
    needle = NEEDLE.format(type_needle_v="numbers", key=key, value=value)
    fill = dict(type_needle_v="number", query=key)
    template, prefix = singular(NIAH_TEMPLATE), singular(NIAH_PREFIX).format(**fill)

    def render(n: int) -> tuple[Built, float]:
        context, at = place(data.essay_text(n), needle, depth)
        return Built(template.format(context=context, **fill), prefix, [value]), at

    n = fit(
        lambda n: count_tokens(tok, chat_text(tok, render(n)[0])), length - MAX_NEW_TOKENS, length
    )
    built, at = render(n)
    ids = tok.encode(chat_text(tok, built), add_special_tokens=False)
    return Cell(length, depth, index, ids, value, at)


@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]
    samples: int
    scores: dict[int, dict[float, float]]  # length -> depth -> percent retrieved
    wall_s: float
    samples_per_s: float
    records: list[dict]


def run(
    llm,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int = 42,
    progress: bool = True,
) -> Grid:
    """Build every cell, generate all of them in one batch, score by exact value match."""
    from longserve import SamplingParams

    tok = llm.get_tokenizer()
    todo = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    cells = [
        build_cell(tok, n, d, i, seed) for n, d, i in tqdm(todo, desc="build", disable=not progress)
    ]
    t0 = time.perf_counter()
    outs = llm.generate(
        [{"prompt_token_ids": c.prompt_token_ids} for c in cells],
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS),
        use_tqdm=progress,
    )
    wall = time.perf_counter() - t0
    records = [
        dict(
            length=c.length,
            depth=c.depth,
            index=c.index,
            prompt_tokens=len(c.prompt_token_ids),
            needle_depth=round(c.needle_depth, 4),
            answer=c.value,
            pred=o.outputs[0].text,
            hit=c.value in o.outputs[0].text,
        )
        for c, o in zip(cells, outs, strict=True)
    ]
    scores = {
        n: {
            d: round(
                100
                * sum(r["hit"] for r in records if r["length"] == n and r["depth"] == d)
                / samples,
                2,
            )
            for d in depths
        }
        for n in lengths
    }
    return Grid(
        list(lengths),
        list(depths),
        samples,
        scores,
        round(wall, 2),
        round(len(cells) / wall, 4),
        records,
    )


def heatmap(grid: Grid, path: str, title: str) -> None:
    """The familiar picture: context length across, depth down (0% at the top), red to green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    z = [[grid.scores[n][d] for n in grid.lengths] for d in grid.depths]
    fig, ax = plt.subplots(
        figsize=(max(6, 1.1 * len(grid.lengths) + 3), 0.45 * len(grid.depths) + 2)
    )
    im = ax.imshow(z, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(z):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(
        range(len(grid.lengths)),
        [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in grid.lengths],
    )
    ax.set_yticks(range(len(grid.depths)), [f"{d:g}" for d in grid.depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="retrieved (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

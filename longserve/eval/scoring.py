"""RULER's two metrics, as its evaluation defines them: case-insensitive substring matches.

string_match_all (every synthetic task): the fraction of a sample's references found in its
prediction, averaged over samples. string_match_part (QA): 1 if any reference is found.
Both report a percentage rounded to 2 decimals, after RULER's clean-up of the prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's clean-up: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def match_all(pred: str, refs: Sequence[str]) -> float:
    """One sample's share of references found in the prediction (0..1)."""
    p = postprocess(pred).lower()
    return sum(r.lower() in p for r in refs) / len(refs)


def match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction."""
    p = postprocess(pred).lower()
    return float(any(r.lower() in p for r in refs))


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(100 * sum(map(match_all, preds, refs)) / len(preds), 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(100 * sum(map(match_part, preds, refs)) / len(preds), 2)


METRICS = {"string_match_all": match_all, "string_match_part": match_part}

"""New, unlabelled images: the model's suggestion for each, and the order to label them in.

Labelling the images a model is least sure of teaches it most (active learning's "margin"
rule: the gap between the two likeliest classes); twenty near-copies in a row teach it little
more than one, so ``diverse`` (the default) defers an image while one very like it (cosine
similarity of the model's features at or above ``NEAR``) was among the last ``WINDOW`` listed.
``benchmarks/label_noise.py`` compares the orders. Images the open-set score calls unknown
("none of these classes?") come after every known one, least unknown first.
"""

from __future__ import annotations

import csv
import io
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graftkit.files import write_text

ORDERS = ("diverse", "uncertain", "confident", "random")
DEFAULT_ORDER = "diverse"
NEAR = 0.9  # cosine similarity of two images' features above which they count as near-copies
WINDOW = 25  # how far back a near-copy defers an image
LOOKAHEAD = 256  # candidates looked at for each place before the least sure is taken anyway
COLUMNS = ("order", "path", "suggested", "probability", "second", "p_second", "margin", "known",
           "ood_score")


@dataclass(frozen=True)
class Suggestion:
    """The model's answer for one unlabelled image, and where it comes in the order (1 first)."""

    order: int
    path: str
    suggested: str
    probability: float
    second: str
    p_second: float
    known: bool
    ood_score: float | None

    @property
    def margin(self) -> float:
        return self.probability - self.p_second

    def as_dict(self) -> dict:
        return {"order": self.order, "path": self.path, "suggested": self.suggested,
                "probability": self.probability, "second": self.second,
                "p_second": self.p_second, "margin": self.margin, "known": self.known,
                "ood_score": self.ood_score}


def margins(probs: np.ndarray) -> np.ndarray:
    """Top class minus second class, per row (1 with a single class)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = -np.sort(-probs, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def _normalised(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _spread(first: np.ndarray, features: np.ndarray, near: float, window: int) -> np.ndarray:
    """``first`` (a preferred order) with each image deferred while a near-copy of it is among
    the last ``window`` placed."""
    f = _normalised(features)
    pending: deque[int] = deque(int(i) for i in first)
    placed: list[int] = []
    while pending:
        recent = f[placed[-window:]] if placed else None
        chosen = 0
        if recent is not None:
            look = [pending[j] for j in range(min(LOOKAHEAD, len(pending)))]
            free = (f[look] @ recent.T).max(axis=1) < near
            chosen = int(np.argmax(free)) if free.any() else 0
        pending.rotate(-chosen)
        placed.append(pending.popleft())
        pending.rotate(chosen)
    return np.asarray(placed, dtype=np.int64)


def order(probs: np.ndarray, features: np.ndarray | None = None, how: str = DEFAULT_ORDER,
          known: np.ndarray | None = None, seed: int = 0, near: float = NEAR,
          window: int = WINDOW) -> np.ndarray:
    """Row indices in the order to label them: known images first (by ``how``), then the
    unknown ones by the same rule.

    ``uncertain``: smallest margin first; ``diverse``: the same, near-copies spread apart
    (needs ``features``); ``confident``: largest margin first (what "accept all" takes);
    ``random``: a seeded shuffle.
    """
    if how not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)} (got {how!r})")
    n = len(probs)
    margin = margins(probs)
    if how == "random":
        ranked = np.random.default_rng(seed).permutation(n)
    elif how == "confident":
        ranked = np.argsort(-margin, kind="stable")
    else:
        ranked = np.argsort(margin, kind="stable")
        if how == "diverse" and features is not None and n:
            ranked = _spread(ranked, features, near, window)
    if known is None:
        return ranked
    known = np.asarray(known, dtype=bool)
    return np.concatenate([ranked[known[ranked]], ranked[~known[ranked]]])


def suggest(paths: list[str], probs: np.ndarray, classes: list[str],
            features: np.ndarray | None = None, ood: np.ndarray | None = None,
            threshold: float = float("inf"), how: str = DEFAULT_ORDER,
            seed: int = 0) -> list[Suggestion]:
    """Every image's suggestion, in the order to label them."""
    probs = np.asarray(probs, dtype=np.float64)
    known = (np.ones(len(paths), dtype=bool) if ood is None
             else np.asarray(ood, dtype=np.float64) <= threshold)
    ranked = np.argsort(-probs, axis=1)
    out = []
    for place, i in enumerate(order(probs, features, how, known, seed), 1):
        top, second = int(ranked[i, 0]), int(ranked[i, 1 if probs.shape[1] > 1 else 0])
        out.append(Suggestion(place, paths[i], classes[top], float(probs[i, top]),
                              classes[second] if probs.shape[1] > 1 else "",
                              float(probs[i, second]) if probs.shape[1] > 1 else 0.0,
                              bool(known[i]), None if ood is None else float(ood[i])))
    return out


def write_csv(path: str | os.PathLike, suggestions: list[Suggestion]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for s in suggestions:
        writer.writerow([s.order, s.path, s.suggested, f"{s.probability:.6f}", s.second,
                         f"{s.p_second:.6f}", f"{s.margin:.6f}", str(s.known).lower(),
                         "" if s.ood_score is None else f"{s.ood_score:.6g}"])
    write_text(Path(path), buf.getvalue())

"""Which given labels look wrong, and what they should be: the confident-learning rule.

Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels"
(JAIR 2021): from class probabilities made by a model that did not train on the image
(out-of-fold), each class ``j`` gets a threshold, the mean probability of ``j`` over the images
labelled ``j`` (its self-confidence). An image is flagged when a class other than its given one
reaches that class's threshold and the model's top class is not the given one; the suggestion
is the class above its threshold with the highest probability. Flagged images are ranked by the
probability of their given label, lowest first (cleanlab's "self_confidence" order).

Written here from the paper: cleanlab implements the same rule but is AGPL-3.0, which graftkit's
users could not take on. ``benchmarks/label_noise.py`` measures it.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graftkit.files import write_text

FILE = "label_issues.csv"
COLUMNS = ("rank", "path", "split", "given", "suggested", "p_given", "p_suggested")
METHOD = ("confident learning (Northcutt et al. 2021): out-of-fold probabilities from K heads "
          "on the frozen base's features, per-class thresholds at the mean self-confidence")


@dataclass(frozen=True)
class LabelIssue:
    """One image whose given label looks wrong; ``rank`` 1 is the likeliest."""

    rank: int
    path: str
    split: str
    given: str
    suggested: str
    p_given: float
    p_suggested: float

    def as_row(self) -> list:
        return [self.rank, self.path, self.split, self.given, self.suggested,
                f"{self.p_given:.6f}", f"{self.p_suggested:.6f}"]


@dataclass
class LabelIssues:
    """The findings over a set of labelled images, and how they were found."""

    issues: list[LabelIssue]
    checked: int  # labelled images looked at
    folds: int
    seconds: float

    def record(self, file: str | None = FILE) -> dict:
        """``metrics.json``'s ``label_issues`` section."""
        return {"count": len(self.issues), "checked": self.checked, "file": file,
                "method": METHOD, "folds": self.folds, "seconds": round(self.seconds, 2)}

    def line(self) -> str:
        """One line for a log or a summary."""
        n = len(self.issues)
        return (f"{n} of {self.checked} labels look wrong" if n != 1 else
                f"1 of {self.checked} labels looks wrong") + \
            f" ({self.folds}-fold heads on the frozen features, {self.seconds:.1f} s)"


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's mean probability over the images given that class (above 1 when no image
    has it: such a class is never suggested)."""
    out = np.full(probs.shape[1], 1.0 + 1e-6)
    for j in range(probs.shape[1]):
        mine = labels == j
        if mine.any():
            out[j] = probs[mine, j].mean()
    return out


def confident_learning(probs: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged, suggested)``: the flagged images' indices in rank order, and a suggested
    class for every image (its given class where nothing else passes a threshold)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    other = probs >= thresholds(probs, labels)
    other[rows, labels] = False
    passes = other.any(axis=1)
    suggested = np.where(passes, np.where(other, probs, -1.0).argmax(axis=1), labels)
    flagged = np.flatnonzero(passes & (probs.argmax(axis=1) != labels))
    p_given = probs[rows, labels]
    order = np.lexsort((flagged, p_given[flagged]))  # lowest self-confidence first, then index
    return flagged[order], suggested


def find_issues(probs: np.ndarray, labels, paths: list[str], splits: list[str],
                classes: list[str]) -> list[LabelIssue]:
    """The confident-learning findings as ranked ``LabelIssue`` records."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    flagged, suggested = confident_learning(probs, labels)
    return [LabelIssue(rank, paths[i], splits[i], classes[labels[i]], classes[suggested[i]],
                       float(probs[i, labels[i]]), float(probs[i, suggested[i]]))
            for rank, i in enumerate(flagged, 1)]


def write_csv(path: Path, issues: list[LabelIssue]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(issue.as_row() for issue in issues)
    write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[LabelIssue]:
    """A ``label_issues.csv`` back as records (an absent file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [LabelIssue(int(r["rank"]), r["path"], r["split"], r["given"], r["suggested"],
                           float(r["p_given"]), float(r["p_suggested"]))
                for r in csv.DictReader(f)]

"""What a prediction answers, and what an explanation adds to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graftkit.errors import UsageError


@dataclass
class Prediction:
    """One image's answer: the closest class, its probability and the ``top_k`` (label, p)
    pairs; ``known`` is False when the image is unlike the training images (its ``ood_score``,
    higher = less like them, is above the run's threshold); ``label`` stays the closest class.

    In a multi-label run, ``labels`` are the labels given (each above its threshold, most
    likely first; possibly none) and ``probabilities`` every label's; ``label`` is the most
    likely one (given or not).
    """

    path: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    known: bool = True
    ood_score: float | None = None
    labels: list[str] | None = None
    probabilities: dict[str, float] | None = None

    def as_dict(self) -> dict:
        out = {"path": self.path, "label": self.label, "probability": self.probability,
               "top_k": [[lab, p] for lab, p in self.top_k], "known": self.known,
               "ood_score": self.ood_score}
        if self.labels is not None:
            out.update(labels=self.labels, probabilities=self.probabilities)
        return out

    def __str__(self) -> str:
        if self.labels is not None:
            said = ", ".join(f"{x} {self.probabilities[x]:.2f}"  # type: ignore[index]
                             for x in self.labels) or "no label"
            return said if self.known else f"unknown (closest: {said})"
        if self.known:
            return self.label
        return f"unknown (closest: {self.label} {self.probability:.2f})"


class Predictions(list):
    """``predict``'s answers, a list of ``Prediction``; ``skipped``: the files that could not be
    read (``{"path", "reason"}``), left out of the list."""

    skipped: list[dict[str, str]]

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped = []


@dataclass
class Explanation:
    """Why an image got its answer: ``prediction`` (as ``predict`` gives it, from the same
    pass), ``heatmaps`` (label -> an array at the model's input size, 0..1: how much each place
    added to that label), the image as the model saw it (``image``, uint8), and the ``closest``
    training images (path, label, similarity, and the thumbnail's ``index`` in the run folder's
    ``closest.jpg``; None for runs made before graftkit kept them)."""

    prediction: Prediction
    heatmaps: dict[str, np.ndarray]
    image: np.ndarray
    closest: list[dict] | None = None
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (x, y)

    def as_dict(self) -> dict:
        return {**self.prediction.as_dict(), "explained": list(self.heatmaps),
                "peaks": {k: list(v) for k, v in self.peaks.items()},
                "closest": self.closest}


def parse_reject(value) -> str | float:
    """``--reject``: auto (the run's threshold), none (every image known) or a threshold."""
    if str(value) in ("auto", "none"):
        return str(value)
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):  # nan would call every image unknown, inf none
        raise UsageError(f"--reject must be auto, none or a finite threshold in the run's score "
                         f"units (got {value!r})") from None
    return threshold

"""Scores and decisions of a multi-label run: mAP, F1 (micro, macro, per image), and one
threshold per label.

A sigmoid per label answers "how likely", not "yes": the decision needs a threshold, and the
best one differs per label (a rare label's probabilities rarely reach 0.5). Each threshold is
the one that maximises that label's F1 on the validation images; labels with too few
positives there keep the fallback (0.5), since a threshold fitted on two images is noise. The
reported F1s are honest about that choice: each half of the validation images is decided with
the thresholds fitted on the other half (the stored thresholds use all of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graftkit import defaults

FALLBACK = 0.5
MIN_POSITIVES = defaults.MIN_THRESHOLD_POSITIVES  # fewer: the label keeps FALLBACK


def multi_hot(labels: Sequence[Sequence[int]], num_labels: int) -> np.ndarray:
    out = np.zeros((len(labels), num_labels), bool)
    for i, names in enumerate(labels):
        out[i, list(names)] = True
    return out


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """AP of one label (sklearn's, no interpolation); None when it has no positive."""
    from sklearn.metrics import average_precision_score

    if not truth.any():
        return None
    return float(average_precision_score(truth, scores))


def best_threshold(truth: np.ndarray, scores: np.ndarray, fallback: float = FALLBACK) -> float:
    """The threshold with the highest F1 for one label (midway between two neighbouring
    scores, so it does not sit on a training point); ``fallback`` with too few positives."""
    if truth.sum() < MIN_POSITIVES:
        return fallback
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + t.sum())
    # only cut between distinct scores
    valid = np.append(s[:-1] > s[1:], True)
    f1 = np.where(valid, f1, -1)
    i = int(np.argmax(f1))
    return float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i] / 2)


def fit_thresholds(truth: np.ndarray, probs: np.ndarray, how: str | float = "auto") -> np.ndarray:
    """Per-label thresholds: ``"auto"`` (best F1 on these images), or one number for all."""
    if how != "auto":
        return np.full(probs.shape[1], float(how))
    return np.array([best_threshold(truth[:, j], probs[:, j]) for j in range(probs.shape[1])])


def halves(n: int) -> np.ndarray:
    """A fixed split of ``n`` images in two (True: the second half): calibration's, with
    every image in one stratum."""
    from graftkit.outputs.calibration import halves as stratified_halves

    return stratified_halves(np.zeros(n, dtype=np.int64))


def cross_fitted_decisions(truth: np.ndarray, probs: np.ndarray, how: str | float = "auto"
                           ) -> np.ndarray:
    """Yes/no per image and label, each half decided by thresholds fitted on the other."""
    if how != "auto":
        return probs >= fit_thresholds(truth, probs, how)
    second = halves(len(probs))
    out = np.zeros(probs.shape, bool)
    for part in (second, ~second):
        t = fit_thresholds(truth[~part], probs[~part], how)
        out[part] = probs[part] >= t
    return out


def f1_scores(truth: np.ndarray, decided: np.ndarray) -> dict:
    """Micro, macro (labels with a positive or a prediction) and example-based F1, subset
    accuracy."""
    tp = (truth & decided).sum(axis=0)
    fp = (~truth & decided).sum(axis=0)
    fn = (truth & ~decided).sum(axis=0)
    used = (tp + fp + fn) > 0
    per_label = np.where(used, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    inter = (truth & decided).sum(axis=1)
    size = truth.sum(axis=1) + decided.sum(axis=1)
    example = np.where(size > 0, 2 * inter / np.maximum(size, 1), 1.0)  # both empty: right
    return {
        "micro_f1": float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)),
        "macro_f1": float(per_label[used].mean()) if used.any() else 0.0,
        "example_f1": float(example.mean()),
        "subset_accuracy": float((truth == decided).all(axis=1).mean()),
    }


def scores(labels: Sequence[Sequence[int]], probs: np.ndarray, classes: list[str],
           thresholds: np.ndarray, how: str | float = "auto", cross_fit: bool = False) -> dict:
    """Everything ``metrics.json`` says of a multi-label run's validation (or test) images.

    With ``cross_fit`` (the validation images the thresholds were chosen on) the F1s use
    cross-fitted thresholds (see the module docstring), else the stored ``thresholds``; the
    per-label precision and recall are at the stored ones."""
    truth = multi_hot(labels, len(classes))
    aps = [average_precision(truth[:, j], probs[:, j]) for j in range(len(classes))]
    scored = [a for a in aps if a is not None]
    stored = probs >= thresholds
    decided = cross_fitted_decisions(truth, probs, how) if cross_fit else stored
    per_label = []
    for j, name in enumerate(classes):
        tp = int((truth[:, j] & stored[:, j]).sum())
        predicted, positives = int(stored[:, j].sum()), int(truth[:, j].sum())
        per_label.append({
            "label": name, "positives": positives, "predicted": predicted,
            "average_precision": aps[j], "threshold": float(thresholds[j]),
            "precision": tp / predicted if predicted else None,
            "recall": tp / positives if positives else None,
        })
    return {
        "map": float(np.mean(scored)) if scored else None,
        "labels_scored": len(scored),
        **f1_scores(truth, decided),
        "labels_per_image": float(truth.sum(axis=1).mean()) if len(truth) else 0.0,
        "predicted_per_image": float(stored.sum(axis=1).mean()) if len(truth) else 0.0,
        "thresholds": how if isinstance(how, str) else float(how),
        "per_label": per_label,
    }


# --- calibration: one temperature per label -------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # no overflow for very negative logits

    return expit(z)


def bce(logits: np.ndarray, truth: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / T)`` (from logits: no clipping)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - truth * z))


def binary_ece(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """|mean probability - share of positives| per equal-width probability bin, weighted."""
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.mean() * abs(probs[inside].mean() - truth[inside].mean())
    return float(total)


def fit_label_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    from graftkit.outputs.calibration import best_temperature

    return best_temperature(lambda t: bce(logits, truth, t))


def calibrate_labels(logits: np.ndarray, truth: np.ndarray, classes: list[str],
                     mode: str = "auto") -> dict:
    """Each label's temperature and its measured effect (``metrics.json``'s calibration).

    As for one class per image: a label keeps its temperature only when the held-out ECE and
    log-loss (each half of the validation images under the other half's ``T``) both drop;
    labels with fewer than ``MIN_POSITIVES`` positives in either half keep ``T`` = 1."""
    logits = np.asarray(logits, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    second = halves(len(truth))
    rows, temperatures = [], np.ones(len(classes))
    for j, name in enumerate(classes):
        z, y = logits[:, j], truth[:, j]
        nll, calib = bce(z, y), binary_ece(sigmoid(z), y)
        row: dict[str, Any] = {"label": name, "nll_before": nll, "ece_before": calib,
                               "temperature": 1.0, "applied": False}
        enough = min(y[second].sum(), y[~second].sum()) >= MIN_POSITIVES
        if mode != "none" and enough:
            held = np.empty_like(z)
            for part in (second, ~second):
                held[part] = z[part] / fit_label_temperature(z[~part], y[~part])
            nll_after, ece_after = bce(held, y), binary_ece(sigmoid(held), y)
            fitted = fit_label_temperature(z, y)
            row.update(nll_after=nll_after, ece_after=ece_after, fitted_temperature=fitted)
            if nll_after <= nll and ece_after < calib:
                row.update(applied=True, temperature=fitted)
                temperatures[j] = fitted
        rows.append(row)
    kept = [str(r["label"]) for r in rows if r["applied"]]
    reason = ("--calibrate none" if mode == "none" else
              f"a temperature kept for {len(kept)} of {len(classes)} labels (those whose "
              "held-out ECE and log-loss both dropped)" + (f": {', '.join(kept)}" if kept else ""))
    return {"mode": mode, "method": "temperature scaling per label", "images": int(len(truth)),
            "applied": bool(kept), "reason": reason, "temperatures": temperatures.tolist(),
            "per_label": rows}


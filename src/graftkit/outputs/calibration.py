"""Calibrated probabilities: one temperature (Guo et al., 2017) folded into the final layer.

A fine-tuned softmax is over- or under-confident; dividing the logits by one number ``T``
fitted on held-out images fixes most of it and cannot change any argmax. The temperature is
folded into the head's Dense (kernel and bias divided by ``T``), so the saved model stays stock
Keras layers and plain ``keras.saving.load_model`` keeps returning (calibrated) probabilities.
Its effect is measured on images it was not fitted on: each half of the validation images is
scored with the temperature fitted on the other half.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15
MIN_IMAGES = 20  # below this, a fitted temperature is noise: the model is left as it is
T_RANGE = (0.05, 20.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    labels = np.asarray(labels)
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def ece(probs: np.ndarray, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin,
    weighted by the bin's share of the images."""
    rows = reliability(probs, labels, bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows))


def reliability(probs: np.ndarray, labels, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its range, images, mean confidence and accuracy (the diagram)."""
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                        "count": int(inside.sum()),
                        "confidence": float(confidence[inside].mean()),
                        "accuracy": float(correct[inside].mean())})
    return out


def fit_temperature(logits: np.ndarray, labels) -> float:
    """The ``T`` that minimises the NLL of ``softmax(logits / T)`` (a 1-D search on log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    return best_temperature(lambda t: nll(logits, labels, t))


def best_temperature(loss) -> float:
    """The ``T`` in ``T_RANGE`` that minimises ``loss(T)``: a bounded 1-D search on log T."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda s: loss(float(np.exp(s))), bounds=tuple(np.log(T_RANGE)),
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def halves(labels, seed: int = 0) -> np.ndarray:
    """A fixed stratified split of the images in two: True for the second half."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    second = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        second[idx[len(idx) // 2:]] = True
    return second


def cross_fitted(logits: np.ndarray, labels) -> np.ndarray:
    """Each half's probabilities under the temperature fitted on the other half."""
    labels = np.asarray(labels)
    second = halves(labels)
    out = np.empty_like(np.asarray(logits, dtype=np.float64))
    for part in (second, ~second):
        t = fit_temperature(logits[~part], labels[~part])
        out[part] = softmax(np.asarray(logits[part], dtype=np.float64) / t)
    return out


def calibrate(logits: np.ndarray, labels, mode: str = "auto") -> dict:
    """The temperature to fold in and its measured effect, as ``metrics.json`` records it.

    ``mode="auto"`` keeps ``T`` only when it lowers both the held-out ECE and NLL (cross-fitted
    on the two halves of the validation images); ``"none"`` measures the model as it is
    (``T`` = 1).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    before = softmax(logits)
    out: dict[str, Any] = {"mode": mode, "method": "temperature scaling", "bins": ECE_BINS,
           "images": int(len(labels)), "ece_before": ece(before, labels),
           "nll_before": nll(logits, labels), "reliability_before": reliability(before, labels)}
    enough = len(labels) >= MIN_IMAGES and min(np.bincount(labels)[np.unique(labels)]) >= 2
    if mode == "none" or not enough:
        reason = ("--calibrate none" if mode == "none" else
                  f"fewer than {MIN_IMAGES} validation images (or a class with one): "
                  "a temperature fitted on them would be noise")
        return {**out, "temperature": 1.0, "applied": False, "reason": reason,
                "ece_after": out["ece_before"], "nll_after": out["nll_before"],
                "reliability_after": out["reliability_before"]}
    held_out = cross_fitted(logits, labels)
    ece_after = ece(held_out, labels)
    nll_after = float(-np.log(np.clip(held_out[np.arange(len(labels)), labels], 1e-300, None)
                              ).mean())
    temperature = fit_temperature(logits, labels)
    # Both must improve: with a few errors among many images one half's T can sharpen the
    # other half's mistakes into a far worse NLL while the ECE barely moves.
    applied = ece_after < out["ece_before"] and nll_after <= out["nll_before"]
    reason = (f"held-out ECE {out['ece_before']:.4f} -> {ece_after:.4f}, NLL "
              f"{out['nll_before']:.4f} -> {nll_after:.4f} with T = {temperature:.3f}"
              if applied else
              f"T = {temperature:.3f} did not lower both the held-out ECE ({out['ece_before']:.4f} "
              f"-> {ece_after:.4f}) and NLL ({out['nll_before']:.4f} -> {nll_after:.4f}): "
              "the model is left as it is")
    return {**out, "temperature": temperature if applied else 1.0,
            "fitted_temperature": temperature, "applied": bool(applied), "reason": reason,
            "ece_after": ece_after, "nll_after": nll_after,
            "reliability_after": reliability(held_out, labels)}


def fold_temperature(model, temperature) -> None:
    """Divide the final Dense's kernel and bias by ``T``: ``softmax(z / T)`` in stock layers.
    ``T`` may also be one temperature per output (multi-label: each label's sigmoid)."""
    from graftkit.graft import HEAD_DENSE

    t = np.asarray(temperature, dtype=np.float32)
    if np.all(t == 1.0):
        return
    dense = model.get_layer(HEAD_DENSE)
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / t, bias / t])

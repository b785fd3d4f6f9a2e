"""An "unknown" answer: how unlike the training images an image is, and where to draw the line.

Every score is "higher = less like the training images". The candidates, measured side by
side by ``benchmarks/open_set.py``:

- ``msp``: 1 - the maximum softmax probability (the baseline; needs only the probabilities);
- ``energy``: -logsumexp of the logits;
- ``mahalanobis``: the smallest Mahalanobis distance (squared) of the penultimate features to
  a class mean, with one covariance shared by the classes (Ledoit-Wolf shrinkage: a few hundred
  images and 1,280 dimensions);
- ``knn``: the distance of the L2-normalised features to their k-th nearest training image
  (Sun et al., 2022).

The threshold is the score that keeps ``keep`` (95%) of the validation images: those images
were not trained on, so the rate carries to new images of the same classes. The statistics and
the threshold live in the run folder (``open_set.npz``), read back by ``graftkit.load``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graftkit import defaults
from graftkit.outputs.run import OPEN_SET_FILE as FILE

METHODS = ("msp", "energy", "mahalanobis", "knn")
DEFAULT_KEEP = defaults.OPEN_SET_KEEP
DEFAULT_K = defaults.OPEN_SET_K
OOD_SCORE = "ood_score"  # the score's layer and output name in exports
# The formula a deployment applies, with the arrays of the file (documented in docs/export.md).
FORMULAS = {
    "msp": "ood_score = 1 - max(probabilities)",
    "energy": "ood_score = -logsumexp(logits), logits = features @ head_kernel + head_bias",
    "mahalanobis": "g = features @ whiten; ood_score = min over classes c of "
                   "sum((g - means_whitened[c])**2)",
    "knn": "z = features / |features|; ood_score = sqrt(max(0, 2 - 2 * s_k)), s_k = the k-th "
           "largest value of z @ bank.T (bank: the training images' normalised features)",
}


def logsumexp(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1)
    return m + np.log(np.exp(logits - m[:, None]).sum(axis=1))


def normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass
class OpenSet:
    """A fitted open-set score and its threshold: ``scores``, ``known``, ``save``, ``load``."""

    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = DEFAULT_K
    threshold: float = float("inf")
    keep: float = DEFAULT_KEEP

    def scores(self, features: np.ndarray | None, probs: np.ndarray,
               logits: np.ndarray | None = None) -> np.ndarray:
        """The score of each image (higher = less like the training images)."""
        if self.method == "msp":
            return (1.0 - probs.max(axis=1)).astype(np.float64)
        if self.method == "energy":
            return -logsumexp(np.asarray(logits, dtype=np.float64))
        f = np.asarray(features, dtype=np.float32)
        if self.method == "mahalanobis":
            g = f @ self.arrays["whiten"]
            means = self.arrays["means_whitened"]
            d = ((g * g).sum(1)[:, None] - 2 * g @ means.T + (means * means).sum(1)[None, :])
            return np.maximum(d.min(axis=1), 0.0).astype(np.float64)
        bank = self._bank32()
        k = min(self.k, len(bank))
        out = np.empty(len(f))
        for i in range(0, len(f), 256):  # bounded memory for large banks
            sims = normalise(f[i: i + 256]) @ bank.T
            kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
            out[i: i + 256] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        return out

    def _bank32(self) -> np.ndarray:
        """The bank in float32, converted once (stored as float16; converting it on every call
        cost more than the product itself for one image: 9 ms of a served request)."""
        bank = self.arrays["bank"]
        if getattr(self, "_bank_source", None) is not bank:
            self._bank_source, self._bank = bank, bank.astype(np.float32)
        return self._bank

    def known(self, scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
        limit = self.threshold if threshold is None else threshold
        return np.asarray(scores) <= limit

    def describe(self) -> dict:
        return {"file": FILE, "method": self.method, "k": self.k if self.method == "knn" else None,
                "threshold": self.threshold, "keep": self.keep, "formula": FORMULAS[self.method],
                "known_if": "ood_score <= threshold"}

    def save(self, path: str | os.PathLike) -> None:
        from graftkit.files import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, method=np.array(self.method), k=np.array(self.k),
                         threshold=np.array(self.threshold), keep=np.array(self.keep),
                         **self.arrays)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> OpenSet:
        with np.load(path, allow_pickle=False) as data:
            meta = {"method", "k", "threshold", "keep"}
            return cls(method=str(data["method"]), k=int(data["k"]),
                       threshold=float(data["threshold"]), keep=float(data["keep"]),
                       arrays={n: data[n] for n in data.files if n not in meta})


def fit_open_set(method: str, train_features: np.ndarray | None, train_labels,
                 num_classes: int, k: int = DEFAULT_K) -> OpenSet:
    """The statistics of ``method`` from the training images' penultimate features."""
    if method not in METHODS:
        raise ValueError(f"unknown open-set method {method!r}; one of {', '.join(METHODS)}")
    if method in ("msp", "energy"):
        return OpenSet(method)
    f = np.asarray(train_features, dtype=np.float32)
    if method == "knn":
        if len(f) > defaults.OPEN_SET_MAX_BANK:  # a fixed sample: bounded file, export and time
            keep = np.random.RandomState(0).choice(len(f), defaults.OPEN_SET_MAX_BANK,
                                                   replace=False)
            f = f[np.sort(keep)]
        return OpenSet(method, {"bank": normalise(f).astype(np.float16)}, k=k)
    from sklearn.covariance import LedoitWolf

    labels = np.asarray(train_labels)
    present = [c for c in range(num_classes) if (labels == c).any()]
    means = np.stack([f[labels == c].mean(axis=0) for c in present]).astype(np.float64)
    centred = f - means[np.searchsorted(present, labels)]
    precision = LedoitWolf().fit(centred).precision_
    # precision = L L^T: distances become plain squared norms after one matrix product.
    whiten = np.linalg.cholesky((precision + precision.T) / 2).astype(np.float32)
    return OpenSet(method, {"whiten": whiten,
                            "means_whitened": (means @ whiten).astype(np.float32)})


def choose_threshold(scores: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The score that keeps ``keep`` of these (held-out, known) images (no images: none
    is rejected)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return float("inf")
    return float(np.quantile(scores, keep, method="higher"))


def held_out_rejection(scores: np.ndarray, labels, keep: float = DEFAULT_KEEP) -> float | None:
    """Share of known images rejected by a threshold chosen on the *other* half of them (both
    ways, averaged): what new images of the classes meet. None when a half would be empty."""
    from graftkit.outputs.calibration import halves

    half = halves(labels)
    if not 0 < half.sum() < len(half):
        return None
    scores = np.asarray(scores)
    return float(np.mean([(scores[~h] > choose_threshold(scores[h], keep)).mean()
                          for h in (half, ~half)]))


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Chance that an unknown image scores above a known one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known_scores)), np.ones(len(unknown_scores))]
    return float(roc_auc_score(y, np.r_[known_scores, unknown_scores]))


def fpr_at_95(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Share of unknown images accepted at the threshold that keeps 95% of the known ones."""
    return float((np.asarray(unknown_scores) <= choose_threshold(known_scores, 0.95)).mean())


def open_set_model(model, open_set: OpenSet):
    """``model`` with two named outputs, ``probabilities`` and ``ood_score``: the score computed
    in the graph (stock ops: matmul, top-k, min), so an export answers "unknown" on its own."""
    import keras
    from keras import layers, ops

    from graftkit.graft import HEAD_DENSE, with_features

    class OpenSetScore(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.method, self.k = open_set.method, open_set.k
            arrays = {name: a if a.dtype == np.float16 else a.astype(np.float32)
                      for name, a in _graph_arrays(open_set, dense).items()}
            self.constants = {name: self.add_weight(
                shape=a.shape, initializer=keras.initializers.Constant(a), dtype=a.dtype.name,
                trainable=False, name=name) for name, a in arrays.items()}

        def call(self, features, probs):
            c = self.constants
            if self.method == "msp":
                return 1.0 - ops.max(probs, axis=1)
            if self.method == "energy":
                return -ops.logsumexp(ops.matmul(features, c["kernel"]) + c["bias"], axis=1)
            if self.method == "mahalanobis":
                g = ops.matmul(features, c["whiten"])
                d = (ops.sum(g * g, axis=1, keepdims=True) - 2.0 * ops.matmul(g, c["means_t"])
                     + c["means_sq"])
                return ops.maximum(ops.min(d, axis=1), 0.0)
            z = features / ops.maximum(ops.norm(features, axis=1, keepdims=True), 1e-12)
            bank = ops.cast(c["bank_t"], "float32")  # stored in float16: half the file
            kth = ops.top_k(ops.matmul(z, bank), min(self.k, c["bank_t"].shape[1]))[0]
            return ops.sqrt(ops.maximum(2.0 - 2.0 * kth[:, -1], 0.0))

    dense = model.get_layer(HEAD_DENSE)
    features, probs = with_features(model).outputs
    score = OpenSetScore(name=OOD_SCORE, dtype="float32")(features, probs)
    return keras.Model(model.inputs[0], {"probabilities": probs, OOD_SCORE: score},
                       name=f"{model.name}_open_set")


def _graph_arrays(open_set: OpenSet, dense) -> dict[str, np.ndarray]:
    a = open_set.arrays
    if open_set.method == "energy":
        kernel, bias = dense.get_weights()
        return {"kernel": kernel, "bias": bias}
    if open_set.method == "knn":
        # The training images' unit features, in float16 (the export's largest part): a
        # cosine over 1,280 dimensions moves by ~1e-5, far inside the score's 1e-3 tolerance.
        return {"bank_t": a["bank"].astype(np.float16).T.copy()}
    if open_set.method == "mahalanobis":
        means = a["means_whitened"].astype(np.float32)
        return {"whiten": a["whiten"], "means_t": means.T.copy(),
                "means_sq": (means * means).sum(1)[None, :]}
    return {}

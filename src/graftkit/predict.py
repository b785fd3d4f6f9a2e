"""A finished run as a classifier: ``graftkit.load(run_dir).predict(paths)``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graftkit.defaults import IMAGE_EXTENSIONS
from graftkit.errors import DataError


@dataclass
class Prediction:
    path: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]

    def as_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "top_k": [[lab, p] for lab, p in self.top_k]}


def expand_paths(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[dict[str, str]]]:
    """Files as given, folders walked for images; returns ``(images, skipped)``."""
    from graftkit.data import check_image

    found, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            candidates = sorted(f for f in p.rglob("*")
                                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                                and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            candidates = [p]
        else:
            raise DataError(f"no such file or folder: {p}")
        for f in candidates:
            reason = check_image(str(f))
            if reason:
                skipped.append({"path": str(f), "reason": reason})
            else:
                found.append(str(f))
    return found, skipped


class Classifier:
    """A trained graftkit model with its labels: ``predict``, ``predict_proba``, ``evaluate``."""

    def __init__(self, model, classes: list[str], metrics: dict | None = None, fast: bool = True,
                 train_digests: list[str] | None = None):
        self.model = model
        self.classes_ = list(classes)
        self.metrics_ = metrics or {}
        self.train_digests_ = train_digests  # SHA-256 of the training images, when recorded
        self.image_size_ = int(model.inputs[0].shape[1])
        self.fast = fast
        self._split = None

    def _fast_path(self):
        """The frozen bottom through TFLite + the rest in Keras, when the model splits."""
        if self.fast and self._split is None:
            from graftkit.features import split_classifier

            self._split = split_classifier(self.model, self.metrics_) or False
        return self._split or None

    def predict_proba(self, paths: Sequence[str], batch_size: int = 32, tta: bool = False,
                      progress=None) -> np.ndarray:
        from graftkit.evaluate import predict_proba

        return predict_proba(self.model, list(paths), batch_size, tta, progress,
                             fast=self._fast_path())

    def predict(self, paths: Sequence[str], top_k: int = 1, batch_size: int = 32,
                tta: bool = False, progress=None) -> list[Prediction]:
        """Top-k labels for each image file (decoded exactly as in training).

        ``tta`` averages each image with its mirror image (test-time augmentation).
        """
        probs = self.predict_proba(paths, batch_size, tta, progress)
        k = max(1, min(top_k, len(self.classes_)))
        out = []
        for path, p in zip(paths, probs):
            order = np.argsort(-p)[:k]
            top = [(self.classes_[i], float(p[i])) for i in order]
            out.append(Prediction(str(path), top[0][0], top[0][1], top))
        return out

    def evaluate(self, data_dir: str | os.PathLike, batch_size: int = 32,
                 tta: bool = False) -> dict:
        """Scores on a class folder, a CSV/TSV of ``path,label``, or the ``val/`` of a folder
        with ``train/`` and ``val/``. ``tta`` adds the scores of test-time augmentation (each
        image averaged with its mirror image) and their gain, so its worth is measured, not
        assumed; the main scores stay those of the plain images."""
        from graftkit.data import check_data_path, find_split_dirs, require_classes, scan_classes
        from graftkit.evaluate import scores
        from graftkit.sources import is_tfds, materialise_tfds

        check_data_path(data_dir)
        root = materialise_tfds(str(data_dir)) if is_tfds(data_dir) else Path(data_dir)
        dirs = find_split_dirs(root) if root.is_dir() else None
        folder = dirs[1] if dirs else root
        skipped: list[dict[str, str]] = []
        probes: dict = {}
        by_class = scan_classes(folder, skipped, probes)
        by_class = {c: ps for c, ps in by_class.items() if ps}
        if not by_class:
            require_classes(by_class, folder)
        unknown = sorted(set(by_class) - set(self.classes_))
        if unknown:
            raise DataError(
                f"{folder} has classes the model was not trained on: {', '.join(unknown)}; "
                f"the model knows {', '.join(self.classes_)}"
            )
        paths = [p for ps in by_class.values() for p in ps]
        labels = [self.classes_.index(c) for c, ps in by_class.items() for _ in ps]
        result = scores(labels, self.predict_proba(paths, batch_size), self.classes_)
        if tta:
            augmented = scores(labels, self.predict_proba(paths, batch_size, tta=True),
                               self.classes_)
            result["tta"] = {
                "method": "mean of the image's and its mirror image's probabilities",
                "accuracy": augmented["accuracy"],
                "balanced_accuracy": augmented["balanced_accuracy"],
                "gain": augmented["accuracy"] - result["accuracy"],
                "balanced_gain": augmented["balanced_accuracy"] - result["balanced_accuracy"],
            }
        result["data"] = str(folder)
        result["skipped_files"] = skipped
        result["overlap"] = self._overlap(paths, [probes[p].sha256 for p in paths])
        return result

    def _overlap(self, paths: list[str], digests: list[str]) -> dict:
        """Evaluation images that are training images by content: the score flatters them."""
        train = self.train_digests_
        if train is None:
            return {"checked": False, "count": None, "examples": [],
                    "message": "this run records no training-image digests (made by an older "
                               "graftkit): overlap with its training images could not be checked"}
        known = set(train)
        same = [p for p, d in zip(paths, digests) if d in known]
        message = "" if not same else (
            f"{len(same)} of {len(paths)} evaluation images are training images of this run "
            f"(same content), so the accuracy flatters the model: e.g. "
            + ", ".join(Path(p).name for p in same[:3]))
        return {"checked": True, "count": len(same), "examples": same[:10], "message": message}


def load(run_dir: str | os.PathLike, unsafe: bool = False) -> Classifier:
    """Load a run folder written by ``graft fit`` (safe mode: no code runs from the file)."""
    from graftkit.backbones.registry import load_keras_file
    from graftkit.errors import RunError
    from graftkit.run import read_run, read_split

    model_path, labels, metrics = read_run(run_dir)
    model = load_keras_file(model_path, unsafe, RunError)
    outputs = int(model.outputs[0].shape[-1])
    if len(labels) != outputs:  # names would be attached to the wrong outputs
        raise RunError(f"{Path(run_dir) / 'labels.json'} names {len(labels)} classes but "
                       f"{model_path.name} has {outputs} outputs: restore the labels.json written "
                       "with this model (one name per output, in training order)")
    try:
        digests = read_split(run_dir).get("train_sha256")
    except (RunError, OSError, ValueError):
        digests = None
    return Classifier(model, labels, metrics, train_digests=digests)

"""What you predict with: the object ``graftkit.fit`` returns and ``graftkit.load`` gives back.

A ``Classifier`` is a trained Keras model with its class names, its run's metrics and the folder
the run was written to. Images go in as file paths and are decoded exactly as in training (the
model holds its backbone's preprocessing), so a raw photo gets the answer training measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graftkit import defaults
from graftkit.errors import DataError


@dataclass
class Prediction:
    """One image's answer: the top label, its probability and the ``top_k`` (label, p) pairs."""

    path: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]

    def as_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "top_k": [[lab, p] for lab, p in self.top_k]}


class Classifier:
    """A trained image classifier: ``predict``, ``predict_proba`` and ``evaluate`` on image files.

    Args:
        model: the trained ``keras.Model`` (raw RGB pixels in, class probabilities out).
        classes: the class names, in the order of the model's outputs.
        metrics: the run's ``metrics.json``. Defaults to None (no metrics).
        run_dir: the run folder the model was written to. Defaults to None.
        fast: run the frozen bottom through the run's TFLite engine when the model splits.
            Defaults to True.
        train_digests: SHA-256 of the training images, to warn when evaluation images are
            training images. Defaults to None (not checked).

    Attributes:
        model, classes, metrics, run_dir: as given. ``image_size``: the model's input side.

    Example:
        >>> clf = graftkit.load("runs/photos")  # doctest: +SKIP
        >>> clf.predict(["new/photo.jpg"])[0].label  # doctest: +SKIP
        'bees'
    """

    def __init__(self, model, classes: Sequence[str], metrics: dict | None = None,
                 run_dir: str | os.PathLike | None = None, fast: bool = True,
                 train_digests: Sequence[str] | None = None):
        self.model = model
        self.classes = list(classes)
        self.metrics = metrics or {}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.train_digests = list(train_digests) if train_digests is not None else None
        self.image_size = int(model.inputs[0].shape[1])
        self.fast = fast
        self._split = None

    def __repr__(self) -> str:
        where = f", run_dir='{self.run_dir}'" if self.run_dir else ""
        return f"Classifier(classes={self.classes}{where})"

    def _fast_path(self):
        """The frozen bottom through TFLite + the rest in Keras, when the model splits."""
        if self.fast and self._split is None:
            from graftkit.frozen.cut import split_classifier

            self._split = split_classifier(self.model, self.metrics) or False
        return self._split or None

    def predict_proba(self, paths: Sequence[str | os.PathLike], batch_size: int = defaults.BATCH_SIZE,
                      tta: bool = False, progress=None) -> np.ndarray:
        """Class probabilities of image files.

        Args:
            paths: image files.
            batch_size: images per model call. Defaults to 32.
            tta: average each image with its mirror image. Defaults to False.
            progress: ``progress(done, total)`` called as batches finish. Defaults to None.

        Returns:
            A float array of shape ``(len(paths), len(classes))``; rows sum to 1.
        """
        from graftkit.outputs.evaluation import probabilities

        return probabilities(self.model, [str(p) for p in paths], batch_size, tta, progress,
                             fast=self._fast_path())

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 1, batch_size: int = defaults.BATCH_SIZE,
                tta: bool = False, progress=None) -> list[Prediction]:
        """The most likely labels of image files.

        Args:
            paths: image files.
            top_k: labels per image, most likely first (capped at the number of classes).
                Defaults to 1.
            batch_size, tta, progress: as in ``predict_proba``.

        Returns:
            One ``Prediction`` per path, in order.
        """
        probs = self.predict_proba(paths, batch_size, tta, progress)
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for path, p in zip(paths, probs):
            order = np.argsort(-p)[:k]
            top = [(self.classes[i], float(p[i])) for i in order]
            out.append(Prediction(str(path), top[0][0], top[0][1], top))
        return out

    def evaluate(self, data_dir: str | os.PathLike, batch_size: int = defaults.BATCH_SIZE,
                 tta: bool = False) -> dict:
        """Scores on labelled images the model has not seen.

        Args:
            data_dir: a class folder, a CSV/TSV of ``path,label`` rows, a folder with
                ``train/`` and ``val/`` (its ``val/`` is used), or ``tfds:NAME[:SPLIT]``.
            batch_size: as in ``predict_proba``.
            tta: also score test-time augmentation (each image averaged with its mirror
                image) and report its gain; the main scores stay those of the plain images.
                Defaults to False.

        Returns:
            A dict: ``accuracy``, ``balanced_accuracy``, ``per_class``, ``confusion_matrix``,
            ``classes``, ``data``, ``skipped_files``, ``overlap`` (evaluation images that are
            training images of this run) and, with ``tta``, ``tta``.
        """
        from graftkit.outputs.evaluation import scores

        paths, labels, folder, skipped, digests = self._labelled(data_dir)
        result = scores(labels, self.predict_proba(paths, batch_size), self.classes)
        if tta:
            augmented = scores(labels, self.predict_proba(paths, batch_size, tta=True),
                               self.classes)
            result["tta"] = {
                "method": "mean of the image's and its mirror image's probabilities",
                "accuracy": augmented["accuracy"],
                "balanced_accuracy": augmented["balanced_accuracy"],
                "gain": augmented["accuracy"] - result["accuracy"],
                "balanced_gain": augmented["balanced_accuracy"] - result["balanced_accuracy"],
            }
        result["data"] = str(folder)
        result["skipped_files"] = skipped
        result["overlap"] = self._overlap(paths, digests)
        return result

    def _labelled(self, data_dir):
        """``(paths, labels, folder, skipped, digests)`` of an evaluation folder."""
        from graftkit.data.folder import (
            check_data_path,
            find_split_dirs,
            require_classes,
            scan_classes,
        )
        from graftkit.data.sources import is_tfds, materialise_tfds

        check_data_path(data_dir)
        root = materialise_tfds(str(data_dir)) if is_tfds(data_dir) else Path(data_dir)
        dirs = find_split_dirs(root) if root.is_dir() else None
        folder = dirs[1] if dirs else root
        skipped: list[dict[str, str]] = []
        probes: dict = {}
        by_class = {c: ps for c, ps in scan_classes(folder, skipped, probes).items() if ps}
        if not by_class:
            require_classes(by_class, folder)
        unknown = sorted(set(by_class) - set(self.classes))
        if unknown:
            raise DataError(
                f"{folder} has classes the model was not trained on: {', '.join(unknown)}; "
                f"the model knows {', '.join(self.classes)}"
            )
        paths = [p for ps in by_class.values() for p in ps]
        labels = [self.classes.index(c) for c, ps in by_class.items() for _ in ps]
        return paths, labels, folder, skipped, [probes[p].sha256 for p in paths]

    def _overlap(self, paths: list[str], digests: list[str]) -> dict:
        """Evaluation images that are training images by content: the score flatters them."""
        if self.train_digests is None:
            return {"checked": False, "count": None, "examples": [],
                    "message": "this run records no training-image digests (made by an older "
                               "graftkit): overlap with its training images could not be checked"}
        known = set(self.train_digests)
        same = [p for p, d in zip(paths, digests) if d in known]
        message = "" if not same else (
            f"{len(same)} of {len(paths)} evaluation images are training images of this run "
            f"(same content), so the accuracy flatters the model: e.g. "
            + ", ".join(Path(p).name for p in same[:3]))
        return {"checked": True, "count": len(same), "examples": same[:10], "message": message}


def load(run_dir: str | os.PathLike, unsafe: bool = False) -> Classifier:
    """Load the classifier of a run folder written by ``graft fit`` or ``graftkit.fit``.

    Args:
        run_dir: the run folder (it holds ``model.keras``, ``labels.json``, ``metrics.json``).
        unsafe: allow a model that contains code (Lambda layers); only for files you trust.
            Defaults to False: no code from the file runs.

    Returns:
        A ``Classifier``.

    Example:
        >>> clf = graftkit.load("runs/photos")  # doctest: +SKIP
        >>> clf.evaluate("more_photos/")["accuracy"]  # doctest: +SKIP
    """
    from graftkit.backbones.registry import load_keras_file
    from graftkit.errors import RunError
    from graftkit.outputs.run import read_run, read_split

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
    return Classifier(model, labels, metrics, run_dir=run_dir, train_digests=digests)

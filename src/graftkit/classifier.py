"""What you predict with: the object ``graftkit.fit`` returns and ``graftkit.load`` gives back.

A ``Classifier`` is a trained Keras model with its class names, its run's metrics and the folder
the run was written to. Images go in as file paths and are decoded exactly as in training (the
model holds its backbone's preprocessing), so a raw photo gets the answer training measured.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

    from graftkit.frozen.cut import SplitClassifier
    from graftkit.outputs.heatmaps import FeatureMaps
    from graftkit.outputs.open_set import OpenSet

from graftkit import defaults
from graftkit.errors import DataError, UsageError
from graftkit.outputs.answers import Explanation, Prediction, Predictions, parse_reject
from graftkit.outputs.record import RunRecord

__all__ = ["Classifier", "Explanation", "Prediction", "Predictions", "load", "parse_reject"]


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

    def __init__(self, model, classes: Sequence[str], metrics: RunRecord | dict | None = None,
                 run_dir: str | os.PathLike | None = None, fast: bool = True,
                 train_digests: Sequence[str] | None = None):
        self.model = model
        self.classes = list(classes)
        # What the run recorded, typed (graftkit reads this); ``metrics`` is the same as the
        # plain dictionary of metrics.json, for users.
        self.record = (metrics if isinstance(metrics, RunRecord)
                       else RunRecord.from_json(metrics))
        self.metrics = self.record.to_json() if isinstance(metrics, RunRecord) else dict(metrics or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.train_digests = list(train_digests) if train_digests is not None else None
        self.image_size = int(model.inputs[0].shape[1])
        self.fast = fast
        self._split_made = False  # the fast path is looked for once, on the first call
        self._split: SplitClassifier | None = None
        self._calls: dict = {}  # compiled functions of models that do not split
        self._maps: FeatureMaps | None = None  # explain's feature maps, built on first use

    @property
    def multi_label(self) -> bool:
        """Several labels per image (sigmoid outputs): ``predict_proba`` gives each label's
        probability; the thresholds are in ``metrics["multi_label"]["per_label"]``."""
        return self.record.task == "multi_label"

    @cached_property
    def thresholds(self) -> np.ndarray | None:
        """Multi-label runs: each label's threshold (metrics.json), in output order."""
        if not self.multi_label:
            return None
        per_label = {r["label"]: r["threshold"] for r in (self.record.multi_label or {}).get(
            "per_label", [])}
        return np.array([per_label.get(c, 0.5) for c in self.classes], dtype=np.float64)

    def require_single_label(self, what: str) -> None:
        """Refuse, with one clear message, what answers one class per image on a run that
        gives several labels per image (an argmax would be a silent wrong answer)."""
        if self.multi_label:
            from graftkit.errors import RunError

            raise RunError(f"{what} answers one class per image, and {self.run_dir or 'this run'} "
                           "is a multi-label run: its validation answers are in predictions.csv "
                           "and report.html; predict_proba gives each label's probability and "
                           "metrics.json multi_label.per_label each label's threshold")

    def __repr__(self) -> str:
        where = f", run_dir='{self.run_dir}'" if self.run_dir else ""
        return f"Classifier(classes={self.classes}{where})"

    @cached_property
    def _features(self) -> keras.Model | None:
        """The model with its penultimate features as a first output (None if it has no head
        of graftkit's: then no open-set score)."""
        from graftkit.graft import with_features

        try:
            return with_features(self.model)
        except ValueError:
            return None

    @property
    def _serving_cut(self) -> tuple[int, int]:
        """``(top_n, pooled_top)``: the blocks the run fine-tuned above its frozen bottom, or
        those its engine ran for a head ``--mode auto`` kept (runs without options: none)."""
        from graftkit.frozen.cut import serving_cut

        options = self.record.options
        return serving_cut(options.get("unfreeze", 0), options.get("fine_tune_epochs", 0),
                           options.get("mode"), (self.record.mode or {}).get("chosen"))

    def _fast_path(self, model) -> SplitClassifier | None:
        """The frozen bottom through TFLite + the rest in Keras, when the model splits."""
        if self.fast and not self._split_made:
            from graftkit.frozen.cut import split_classifier
            from graftkit.frozen.precision import run_engine

            self._split_made = True
            top_n, pooled_top = self._serving_cut
            self._split = split_classifier(model, self.record.backbone, top_n,
                                           self.record.engine_key,
                                           run_engine(self.record.frozen_outputs, self.run_dir),
                                           pooled_top)
            if self._split:  # a conversion, the engine choice or a fallback: said on stderr
                self._split.frozen.notify = lambda text: print(text, file=sys.stderr, flush=True)
        return self._split

    @cached_property
    def open_set(self) -> OpenSet | None:
        """The run's open-set score and threshold (``OpenSet``), or None for runs without one."""
        from graftkit.outputs.open_set import FILE, OpenSet

        path = self.run_dir / FILE if self.run_dir is not None else None
        if path is not None and path.is_file() and self.record.open_set is not None:
            return OpenSet.load(path)
        return None

    @property
    def open_set_note(self) -> str:
        """Why images are all "known" with no score, when that is so."""
        if self.open_set is not None and self._features is not None:
            return ""
        return ("this run has no open-set statistics (made by an older graftkit): every image "
                "counts as known and ood_score is null; run graft fit again to get them")

    def scored(self, images, batch_size: int = defaults.BATCH_SIZE, tta: bool = False,
               progress=None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(probabilities, ood_scores)`` of images (anything ``predict`` takes); the scores
        are None when the run has no open-set statistics. With ``tta`` the probabilities are
        averaged with the mirror image's, the score is the image's own. Unreadable files are
        an error here (rows must match the images): ``predict`` skips them."""
        inputs = self._gathered(images)
        out = self._scored(inputs, batch_size, tta, progress)[:2]
        if inputs.skipped:
            raise DataError(f"{len(inputs.skipped)} of the images cannot be read ("
                            + "; ".join(f"{s['path']}: {s['reason']}" for s in inputs.skipped[:3])
                            + "): predict() skips them and lists them in its result's .skipped")
        return out

    def _gathered(self, images):
        from graftkit.data.inputs import gather

        return gather(images, self.image_size, check=False)  # each file decoded once, to score

    def _scored(self, inputs, batch_size: int, tta: bool, progress):
        """``(probabilities, ood scores or None, penultimate features or None)``; files that
        cannot be read leave ``inputs`` for its ``skipped``."""
        from graftkit.outputs.evaluation import inputs_outputs

        model, scores = self._scoring_model()
        merged = inputs_outputs(model, inputs, batch_size, tta, progress,
                                self._fast_path(model), lambda x: self._run_pixels(model, x))
        return (merged[-1], self._ood(*merged) if scores else None,
                merged[0] if len(merged) > 1 else None)

    def scored_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``scored`` for images already decoded by ``load_image`` (uint8, stacked): what
        ``graft serve`` calls on the uploads of one batch."""
        model, scores = self._scoring_model()
        outs = self._run_pixels(model, np.ascontiguousarray(pixels, dtype=np.float32))
        return outs[-1], self._ood(*outs) if scores else None

    def _scoring_model(self):
        """``(model, True)``: the model with features for the open-set score, when the run has
        one; else ``(model, False)``: the plain classifier."""
        featured = self._features
        if featured is None or self.open_set is None:
            return self.model, False
        return featured, True

    def _run_pixels(self, model, x: np.ndarray) -> list[np.ndarray]:
        fast = self._fast_path(model)
        if fast is not None:
            fast.plan(len(x))  # the run's cached engine when there is one; Keras otherwise
            return fast.outputs(x)
        if model not in self._calls:
            from graftkit.frozen.engine import compiled

            self._calls[model] = compiled(model)
        return self._calls[model](x)

    def _ood(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        open_set = self.open_set
        assert open_set is not None  # called only for runs with open-set statistics
        logits = None
        if open_set.method == "energy":
            from graftkit.graft import head_logits

            logits = head_logits(self.model, features)
        return open_set.scores(features, probs, logits)

    def threshold(self, reject: str | float = "auto") -> float:
        """The score above which an image is unknown under ``reject`` (auto / none / number)."""
        reject = parse_reject(reject)
        if reject == "none" or self.open_set is None:
            return float("inf")
        return self.open_set.threshold if reject == "auto" else float(reject)

    def predict_proba(self, images, batch_size: int = defaults.BATCH_SIZE, tta: bool = False,
                      progress=None) -> np.ndarray:
        """Class probabilities of images.

        Args:
            images: what ``predict`` takes. An unreadable file is an error here, since the
                rows must match the images (``predict`` skips it instead).
            batch_size: images per model call. Defaults to 32.
            tta: average each image with its mirror image. Defaults to False.
            progress: ``progress(done, total)`` called as batches finish. Defaults to None.

        Returns:
            A float array of shape ``(images, len(classes))``; rows sum to 1 (multi-label
            runs: each label's own probability).
        """
        return self.scored(images, batch_size, tta, progress)[0]

    def predict(self, images, top_k: int = 1, batch_size: int = defaults.BATCH_SIZE,
                tta: bool = False, progress=None, reject: str | float = "auto") -> Predictions:
        """The most likely labels of images, and whether each is like the training images.

        Args:
            images: an image file or a folder of them (walked as ``graft predict`` does), a PIL
                image, a numpy array of raw 0-255 RGB (``(H, W, 3)``, grayscale, RGBA, or a
                batch ``(N, H, W, 3)``), or a list of any of these. Images in memory are
                converted as files are (orientation, alpha, bilinear resize); only a large JPEG
                file differs a little, as it is decoded at reduced scale first.
            top_k: labels per image, most likely first (capped at the number of classes).
                Defaults to 1.
            batch_size, tta, progress: as in ``predict_proba``.
            reject: ``"auto"`` (the run's threshold, chosen to keep 95% of its validation
                images), ``"none"`` (every image known; the score is still given) or a
                threshold in the score's units. Defaults to "auto".

        Returns:
            A list of ``Prediction``, one per readable image in order (``path`` is the file,
            or ``<image N>`` for an image in memory); its ``skipped`` attribute lists the
            files that could not be read, with the reason, as ``graft predict`` reports them.

        Example:
            >>> clf.predict("photo.jpg")[0].label  # doctest: +SKIP
            >>> clf.predict(PIL.Image.open("photo.jpg"), top_k=3)  # doctest: +SKIP
        """
        parse_reject(reject)  # a bad value fails before the images are scored
        inputs = self._gathered(images)
        out = Predictions()
        out.skipped = inputs.skipped
        if inputs.names:
            probs, ood, _ = self._scored(inputs, batch_size, tta, progress)
            out.extend(self.answers(inputs.names, probs, ood, top_k, reject))
        return out

    def explain(self, images, label: str | None = None, k: int = defaults.EXPLAIN_CLOSEST,
                top_k: int = 1, batch_size: int = defaults.BATCH_SIZE,
                reject: str | float = "auto", progress=None) -> list[Explanation]:
        """Why each image got its answer: where the model looked and which training images it
        resembles.

        Args:
            images: anything ``predict`` takes.
            label: the class (or label) to explain; None: the predicted one (in a multi-label
                run, each label given, or the likeliest when none is).
            k: closest training images per image. Defaults to 3.
            top_k, batch_size, reject, progress: as in ``predict``.

        Returns:
            One ``Explanation`` per readable image: the prediction (from the same pass), a
            heatmap per explained label at the model's input size, and the closest training
            images. The list's ``skipped`` names the files that could not be read.
        """
        from graftkit.outputs.closest import Closest
        from graftkit.outputs.heatmaps import explain_batch

        parse_reject(reject)
        if label is not None and label not in self.classes:
            raise UsageError(f"unknown label {label!r}: the run knows {', '.join(self.classes)}")
        inputs = self._gathered(images).checked()
        bank = Closest.load(self.run_dir) if k > 0 else None
        out = Predictions()
        out.skipped = inputs.skipped
        runner = self._feature_maps()
        kernel, bias = self.model.get_layer("head_dense").get_weights()
        runner.plan(len(inputs.names))
        for first in range(0, len(inputs.names), batch_size):
            rows = range(first, min(first + batch_size, len(inputs.names)))
            pixels = np.stack([inputs.image(i, self.image_size) for i in rows])
            batch = explain_batch(runner(pixels), kernel, bias, self.multi_label)
            ood = self._ood(batch.features, batch.probs) if self.open_set is not None else None
            answers = self.answers([inputs.names[i] for i in rows], batch.probs, ood, top_k,
                                   reject)
            closest = bank.query(batch.features, k) if bank is not None else None
            for j, answer in enumerate(answers):
                wanted = [label] if label is not None else (
                    (answer.labels or [answer.label]) if self.multi_label else [answer.label])
                heat, peaks = batch.heatmaps(j, [self.classes.index(x) for x in wanted],
                                             self.image_size)
                out.append(Explanation(answer, dict(zip(wanted, heat)), pixels[j],
                                       closest[j] if closest is not None else None,
                                       dict(zip(wanted, peaks))))
            if progress is not None:
                progress(rows[-1] + 1, len(inputs.names))
        return out

    def _feature_maps(self) -> FeatureMaps:
        """The base's last feature map on the run's engine (built once)."""
        if self._maps is None:
            from graftkit.frozen.cut import block_pattern_of
            from graftkit.frozen.precision import run_engine
            from graftkit.outputs.heatmaps import FeatureMaps

            # the feature map above the engine's cut, in Keras (a kept head included)
            self._maps = FeatureMaps(self.model, block_pattern_of(self.record.backbone),
                                     sum(self._serving_cut), self.record.engine_key,
                                     run_engine(self.record.frozen_outputs, self.run_dir))
            self._maps.frozen.notify = lambda text: print(text, file=sys.stderr, flush=True)
        return self._maps

    def suggest(self, images, order: str = "diverse", reject: str | float = "auto",
                batch_size: int = defaults.BATCH_SIZE, progress=None,
                tta: bool | None = None) -> Predictions:
        """Labels for unlabelled images, in the order to check them: the images the model is
        least sure of first (they teach it most), near-copies spread apart, and the ones the
        open-set score calls unknown last.

        Args:
            images: what ``predict`` takes (usually a folder of new images).
            order: ``diverse`` (least sure first, near-copies apart), ``uncertain``,
                ``confident`` (surest first) or ``random``. Defaults to "diverse".
            reject: as in ``predict``. Defaults to "auto".
            batch_size, progress: as in ``predict_proba``.
            tta: average each image with its mirror image, as ``predict_proba`` does; None:
                where the run trained on mirrored views (``flip`` in its augmentation), since
                the labels accepted at a given probability are then right more often
                (docs/data-loop.md). Defaults to None.

        Returns:
            A list of ``graftkit.labels.inbox.Suggestion`` (``order``, ``path``,
            ``suggested``, ``probability``, ``second``, ``p_second``, ``margin``, ``known``,
            ``ood_score``); ``skipped`` lists the files that could not be read.

        Example:
            >>> [s.path for s in clf.suggest("inbox/") if s.probability >= 0.9]  # doctest: +SKIP
        """
        self.require_single_label("suggest")
        from graftkit.labels.inbox import ORDERS
        from graftkit.labels.inbox import suggest as ranked

        if order not in ORDERS:
            raise UsageError(f"order must be one of {', '.join(ORDERS)} (got {order!r})")
        parse_reject(reject)
        inputs = self._gathered(images)
        out = Predictions()
        out.skipped = inputs.skipped
        if inputs.names:
            if tta is None:
                tta = bool((self.record.options.get("augment") or {}).get("flip"))
            probs, ood, features = self._scored(inputs, batch_size, tta, progress)
            out.extend(ranked([str(n) for n in inputs.names], probs, self.classes, features,
                              ood, self.threshold(reject), order))
        return out

    def answers(self, names: Sequence[str], probs: np.ndarray, ood: np.ndarray | None,
                top_k: int = 1, reject: str | float = "auto") -> list[Prediction]:
        """``Prediction`` objects from ``scored``'s (or ``scored_pixels``') arrays."""
        limit = self.threshold(reject)
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for i, (name, p) in enumerate(zip(names, probs)):
            order = np.argsort(-p, kind="stable")
            top = [(self.classes[j], float(p[j])) for j in order[:k]]
            score = None if ood is None else float(ood[i])
            known = score is None or score <= limit
            answer = Prediction(str(name), top[0][0], top[0][1], top, known, score)
            if self.thresholds is not None:
                answer.labels = [self.classes[j] for j in order if p[j] >= self.thresholds[j]]
                answer.probabilities = {c: float(q) for c, q in zip(self.classes, p)}
            out.append(answer)
        return out

    def evaluate(self, data_dir: str | os.PathLike, batch_size: int = defaults.BATCH_SIZE,
                 tta: bool = False) -> dict:
        """Scores on labelled images the model has not seen.

        Args:
            data_dir: a class folder, a CSV/TSV of ``path,label`` rows, a folder with
                ``train/`` and ``val/`` (its ``test/`` is used when there is one, else its
                ``val/``), or ``tfds:NAME[:SPLIT]``.
            batch_size: as in ``predict_proba``.
            tta: also score test-time augmentation (each image averaged with its mirror
                image) and report its gain; the main scores stay those of the plain images.
                Defaults to False.

        Returns:
            A dict: ``accuracy``, ``balanced_accuracy``, ``per_class``, ``confusion_matrix``,
            ``classes``, ``data``, ``skipped_files``, ``overlap`` (evaluation images that are
            training images of this run), ``chosen_on`` (images that are its validation
            images, which its choices were made on) and, with ``tta``, ``tta``.
            A multi-label run takes a ``path,labels`` table (or a folder of them: its
            ``test.csv``, else its ``val.csv``) and gives ``graftkit.outputs.multilabel``'s
            scores (mAP, F1s, per label) at the run's thresholds instead of accuracies.
        """
        from graftkit.data.inputs import Inputs
        from graftkit.outputs.evaluation import scores

        if self.multi_label:
            return self._evaluate_label_sets(data_dir, batch_size, tta)
        paths, labels, folder, skipped, digests = self._labelled(data_dir)
        probs, ood = self.scored(Inputs.of_files(paths), batch_size)
        result = scores(labels, probs, self.classes)
        result["rejected"] = self._rejected(ood)
        if tta:
            augmented = scores(labels, self.predict_proba(Inputs.of_files(paths), batch_size,
                                                          tta=True),
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
        result["chosen_on"] = self._chosen_on(paths)
        return result

    def _evaluate_label_sets(self, data_dir, batch_size: int, tta: bool) -> dict:
        from graftkit.data.inputs import Inputs
        from graftkit.data.multilabel import read_labelled
        from graftkit.outputs.multilabel import scores

        paths, labels, table, skipped, digests = read_labelled(
            data_dir, self.classes, self.record.option("label_sep") or " ")
        probs, ood = self.scored(Inputs.of_files(paths), batch_size)
        assert self.thresholds is not None  # a multi-label run
        how = self.record.option("threshold")
        result = scores(labels, probs, self.classes, self.thresholds, how)
        result["num_images"] = len(paths)
        result["rejected"] = self._rejected(ood)
        if tta:
            augmented = scores(labels, self.predict_proba(Inputs.of_files(paths), batch_size,
                                                          tta=True), self.classes,
                               self.thresholds, how)
            result["tta"] = {
                "method": "mean of the image's and its mirror image's probabilities",
                "map": augmented["map"], "example_f1": augmented["example_f1"],
                "gain": (augmented["map"] or 0.0) - (result["map"] or 0.0),
            }
        result.update(data=str(table), skipped_files=skipped,
                      overlap=self._overlap(paths, digests), chosen_on=self._chosen_on(paths))
        return result

    def _chosen_on(self, paths: list[str]) -> dict:
        """Evaluation images that are the run's validation images: they chose the best epoch,
        the mode, the temperature and the threshold, so their accuracy is optimistic."""
        from graftkit.errors import RunError
        from graftkit.outputs.run import read_split

        if self.run_dir is None:
            return {"count": None, "message": ""}
        try:
            val = {os.path.abspath(p) for p, _ in read_split(self.run_dir)["val"]}
        except (RunError, OSError, ValueError, KeyError, TypeError):
            return {"count": None, "message": ""}
        count = sum(os.path.abspath(p) in val for p in paths)
        message = "" if not count else (
            f"{count} of {len(paths)} images are the run's own validation images: they chose "
            f"its best epoch, mode, {'thresholds' if self.multi_label else 'temperature'} and "
            f"open-set threshold, so this {'score' if self.multi_label else 'accuracy'} is "
            "optimistic; evaluate on images the run never saw (a test/ folder, or --test when "
            "fitting)")
        return {"count": count, "message": message}

    def _rejected(self, ood: np.ndarray | None) -> dict:
        """How many images of known classes the run's threshold would call unknown."""
        if ood is None:
            return {"share": None, "count": None, "threshold": None,
                    "message": self.open_set_note}
        limit = self.threshold("auto")
        count = int((ood > limit).sum())
        return {"share": count / len(ood) if len(ood) else 0.0, "count": count,
                "threshold": limit,
                "method": self.open_set.method if self.open_set is not None else None,
                "message": f"{count} of {len(ood)} images score above the run's threshold: "
                           "graft predict would answer unknown for them"}

    def _labelled(self, data_dir):
        """``(paths, labels, folder, skipped, digests)`` of an evaluation folder."""
        from graftkit.data.folder import (
            check_data_path,
            find_split_dirs,
            find_test_dir,
            require_classes,
            scan_classes,
        )
        from graftkit.data.sources import is_tfds, materialise_tfds

        check_data_path(data_dir)
        root = materialise_tfds(str(data_dir)) if is_tfds(data_dir) else Path(data_dir)
        dirs = find_split_dirs(root) if root.is_dir() else None
        test = find_test_dir(root) if root.is_dir() else None
        folder = test or (dirs[1] if dirs else root)  # held-out images first
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
        digests = read_split(Path(run_dir)).get("train_sha256")
    except (RunError, OSError, ValueError):
        digests = None
    return Classifier(model, labels, metrics, run_dir=run_dir, train_digests=digests)

"""The end of a fit: the final model scored, calibrated, its "unknown" threshold chosen on the
validation images, the held-out test images scored once, and the run folder written.

Nothing here trains: it takes the trained model, the scanned data and the run's record
(``RunRecord``, built by ``graftkit.train.finish``) and leaves the files a run is made of, with
``metrics.json`` last (its presence marks a finished run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graftkit import defaults
from graftkit.task import task_of

if TYPE_CHECKING:
    import keras

    from graftkit.data.folder import ImageFolder
    from graftkit.labels.issues import LabelIssues
    from graftkit.outputs.closest import Closest
    from graftkit.outputs.open_set import OpenSet
    from graftkit.outputs.record import RunRecord
    from graftkit.progress import ProgressFactory

# What the validation images decide in a run, so their accuracy is optimistic (metrics.json).
VAL_CHOICES = ("the best epoch of each phase, head-only or fine-tuned (--mode), the temperature "
               "(--calibrate) and the open-set threshold")
VAL_CHOICES_LABEL_SETS = ("the best epoch of each phase, head-only or fine-tuned (--mode), the "
                          "threshold of each label (--threshold) and the open-set threshold")


@dataclass
class TestScores:
    """The held-out test images, scored once by the final model."""

    record: dict[str, Any]  # metrics.json's "test" section
    probs: np.ndarray
    ood: np.ndarray


@dataclass
class FinalScores:
    """The final model on the validation images (temperature and threshold applied)."""

    probs: np.ndarray
    result: dict[str, Any]  # evaluation.scores (or multilabel.scores) of the probabilities
    calibration: dict[str, Any]
    open_set: OpenSet
    open_set_info: dict[str, Any]
    ood: np.ndarray
    test: TestScores | None
    thresholds: np.ndarray | None = None  # multi-label: each label's decision threshold


def final_pass(model: keras.Model, paths: Sequence[str], fast, bars: ProgressFactory | None,
               label: str) -> list[np.ndarray]:
    """The final model's outputs for image files, with a bars bar: the end of a fit
    scores the training, validation and test images, and must not sit silent meanwhile."""
    from graftkit.outputs.evaluation import model_outputs

    bar = bars(label, len(paths)) if bars and len(paths) else None
    try:
        return model_outputs(model, list(paths), fast=fast,
                             progress=(lambda done, _total: bar.update(done)) if bar else None)
    finally:
        if bar:
            bar.close()


def calibrate_and_reject(model: keras.Model, featured: keras.Model, features: np.ndarray,
                         raw_probs: np.ndarray, train_features: np.ndarray,
                         folder: ImageFolder, calibrate: str, log: Callable[[str], None]
                         ) -> tuple[np.ndarray, dict, OpenSet, dict, np.ndarray]:
    """Fold a temperature into the head (``--calibrate``) and fit the open-set score on the
    training features; ``(probabilities, calibration, open set, its summary, val scores)``."""
    from graftkit.graft import head_logits
    from graftkit.outputs import calibration

    labels = np.asarray(folder.val.labels)
    logits = head_logits(featured, features)
    cal = calibration.calibrate(logits, labels, calibrate)
    probs = raw_probs
    if cal["applied"]:
        calibration.fold_temperature(model, cal["temperature"])
        logits = head_logits(featured, features)
        probs = calibration.softmax(logits).astype(np.float32)
    log(f"calibration: {cal['reason']}")
    detector, info, scores = fit_rejection(features, probs, logits, train_features,
                                           folder.train.labels, labels, len(folder.classes),
                                           log)
    return probs, cal, detector, info, scores


def fit_rejection(features: np.ndarray, probs: np.ndarray, logits: np.ndarray,
                  train_features: np.ndarray, train_labels, val_labels, num_classes: int,
                  log: Callable[[str], None]) -> tuple[OpenSet, dict, np.ndarray]:
    """The open-set score fitted on the training features, its threshold chosen on the
    validation images' scores; ``(detector, its summary, val scores)``. ``val_labels``
    stratify the halves its held-out rejection is measured on."""
    from graftkit.outputs import open_set

    detector = open_set.fit_open_set(defaults.OPEN_SET_METHOD, train_features, train_labels,
                                     num_classes, k=defaults.OPEN_SET_K)
    scores = detector.scores(features, probs, logits)
    detector.threshold = open_set.choose_threshold(scores, defaults.OPEN_SET_KEEP)
    held_out = open_set.held_out_rejection(scores, val_labels, defaults.OPEN_SET_KEEP)
    info = {**detector.describe(), "train_images": int(len(train_features)),
            "val_rejected": float((scores > detector.threshold).mean()),
            "val_rejected_held_out": held_out}
    log(f"open set: {detector.method} score, threshold {detector.threshold:.4g} keeps "
        f"{1 - info['val_rejected']:.1%} of the validation images"
        + ("" if held_out is None else f" ({1 - held_out:.1%} of those it was not chosen on)"))
    return detector, info, scores


def score_test(featured: keras.Model, folder: ImageFolder, fast, open_set: OpenSet,
               bars: ProgressFactory | None, log: Callable[[str], None]
               ) -> TestScores | None:
    """The held-out test images, scored once by the final model (temperature and threshold
    included), after every choice was made on the validation images; None without them."""
    from graftkit.graft import head_logits
    from graftkit.outputs.evaluation import scores

    if not folder.test_source or not len(folder.test):
        return None
    features, probs = final_pass(featured, folder.test.paths, fast, bars,
                                 "scoring the test images")
    ood = open_set.scores(features, probs, head_logits(featured, features))
    result = scores(folder.test.labels, probs, folder.classes)
    record = {"accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"],
              "num_images": len(folder.test), "data": folder.test_source,
              "per_class": result["per_class"], "confusion_matrix": result["confusion_matrix"],
              "rejected": float((ood > open_set.threshold).mean())}
    log(f"test: accuracy {record['accuracy']:.4f} on {len(folder.test)} held-out images "
        "(scored once, nothing chosen on them)")
    return TestScores(record, probs, ood)


def score_final(model: keras.Model, featured: keras.Model, folder: ImageFolder, fast,
                train_features: np.ndarray, calibrate: str,
                bars: ProgressFactory | None, log: Callable[[str], None],
                threshold: float | str = "auto") -> FinalScores:
    """Validation scores of the final model, its calibration and open-set threshold (chosen
    on them), then the test images' scores under both."""
    from graftkit.outputs.evaluation import scores

    if folder.multi_label:
        return score_label_sets(model, featured, folder, fast, train_features, calibrate,
                                threshold, bars, log)
    features, raw_probs = final_pass(featured, folder.val.paths, fast, bars,
                                     "scoring the validation images")
    probs, cal, open_set, info, ood = calibrate_and_reject(
        model, featured, features, raw_probs, train_features, folder, calibrate, log)
    result = scores(folder.val.labels, probs, folder.classes)
    test = score_test(featured, folder, fast, open_set, bars, log)
    return FinalScores(probs, result, cal, open_set, info, ood, test)


def score_label_sets(model: keras.Model, featured: keras.Model, folder: ImageFolder, fast,
                     train_features: np.ndarray, calibrate: str, threshold: float | str,
                     bars: ProgressFactory | None, log: Callable[[str], None]) -> FinalScores:
    """``score_final`` of a multi-label run: a temperature per label where it helps
    (``--calibrate``), a threshold per label chosen on the validation images
    (``--threshold``), mAP and F1s, the open-set score, then the test images."""
    from graftkit.graft import head_logits
    from graftkit.outputs import multilabel
    from graftkit.outputs.calibration import fold_temperature

    features, probs = final_pass(featured, folder.val.paths, fast, bars,
                                 "scoring the validation images")
    truth = multilabel.multi_hot(folder.val.labels, len(folder.classes))
    logits = head_logits(featured, features)
    cal = multilabel.calibrate_labels(logits, truth, folder.classes, calibrate)
    if cal["applied"]:  # a monotone change per label: AP unchanged, thresholds fitted after it
        fold_temperature(model, cal["temperatures"])
        logits = logits / np.asarray(cal["temperatures"])
        probs = multilabel.sigmoid(logits).astype(np.float32)
    log(f"calibration: {cal['reason']}")
    thresholds = multilabel.fit_thresholds(truth, probs, threshold)
    result = multilabel.scores(folder.val.labels, probs, folder.classes, thresholds, threshold,
                               cross_fit=True)
    log(f"thresholds: {_threshold_line(result, threshold)}")
    # k-NN on the features: the labels only stratify (here: none) the held-out halves
    detector, info, ood = fit_rejection(features, probs, logits, train_features, None,
                                        np.zeros(len(probs), np.int64), len(folder.classes),
                                        log)
    test = None
    if folder.test_source and len(folder.test):
        t_features, t_probs = final_pass(featured, folder.test.paths, fast, bars,
                                         "scoring the test images")
        t_ood = detector.scores(t_features, t_probs, head_logits(featured, t_features))
        record = multilabel.scores(folder.test.labels, t_probs, folder.classes, thresholds,
                                   threshold)
        record.update(num_images=len(folder.test), data=folder.test_source,
                      rejected=float((t_ood > detector.threshold).mean()))
        log(f"test: mAP {record['map']:.4f}, example-based F1 {record['example_f1']:.4f} on "
            f"{len(folder.test)} held-out images (scored once, nothing chosen on them)")
        test = TestScores(record, t_probs, t_ood)
    return FinalScores(probs, result, cal, detector, info, ood, test, thresholds)


def _threshold_line(result: dict, threshold: float | str) -> str:
    if threshold != "auto":
        return f"{float(threshold):g} for every label"
    ts = [r["threshold"] for r in result["per_label"]]
    return (f"one per label, best F1 on the validation images ({min(ts):.2f}-{max(ts):.2f}); "
            f"F1s below are cross-fitted (each half decided by the other half's thresholds)")


def write_run(run_dir: Path, model: keras.Model, folder: ImageFolder, final: FinalScores,
              record: RunRecord, history: list[dict], log: Callable[[str], None],
              issues: LabelIssues | None = None,
              closest: tuple[Closest, np.ndarray] | None = None,
              int8_engine: tuple[str, bytes] | None = None) -> list[str]:
    """Every file of the run folder, ``metrics.json`` last; the training images' digests.
    ``closest``: the training images' bank and thumbnails, for explanations; ``int8_engine``:
    the frozen part's int8 engine (file name, contents), which predictions must use."""
    from graftkit.files import atomic_write, write_json
    from graftkit.frozen.precision import INT8_ENGINE_FILES
    from graftkit.outputs import run
    from graftkit.outputs.plots import best_row, plot_confusion, plot_history
    from graftkit.outputs.report import build_report

    log(f"writing {run_dir}: model, predictions, plots, report")
    train_sha256 = folder.digests(folder.train)  # may read files the scan could not hash
    run.save_model(model, run_dir / run.MODEL_FILE)
    write_json(run_dir / run.LABELS_FILE, folder.classes)
    write_json(run_dir / run.SPLIT_FILE, {
        "train": [[p, folder.label_text(y)] for p, y in zip(folder.train.paths,
                                                              folder.train.labels)],
        "val": [[p, folder.label_text(y)] for p, y in zip(folder.val.paths, folder.val.labels)],
        "test": [[p, folder.label_text(y)] for p, y in zip(folder.test.paths,
                                                             folder.test.labels)],
        # Content digests: graft evaluate warns when its images are training images; a refit
        # tells new images from relabelled ones by them.
        "train_sha256": train_sha256,
        "val_sha256": folder.digests(folder.val),
    })
    open_set = final.open_set
    open_set.save(run_dir / run.OPEN_SET_FILE)
    for name in INT8_ENGINE_FILES.values():  # a run over another one: no stale engine
        if int8_engine is None or name != int8_engine[0]:
            (run_dir / name).unlink(missing_ok=True)
    if int8_engine is not None:
        atomic_write(run_dir / int8_engine[0], lambda tmp: Path(tmp).write_bytes(int8_engine[1]))
    if closest is not None:
        closest[0].save(run_dir, closest[1])
    import shutil

    from graftkit.outputs.heatmaps import EXPLAIN_DIR

    # The heatmaps of a run this one overwrites must not show in its report.
    shutil.rmtree(run_dir / EXPLAIN_DIR, ignore_errors=True)
    if folder.multi_label:
        _write_label_sets(run_dir, folder, final)
    else:
        _write_classes(run_dir, folder, final)
    if issues is not None:
        from graftkit.labels.issues import FILE, write_csv

        write_csv(run_dir / FILE, issues.issues)
    run.write_history(run_dir / run.HISTORY_FILE, history,
                      task_of(folder.multi_label).history_columns)
    mode = record.mode
    kept = ("head",) if mode and mode.get("chosen") == "head" else ("head", "fine_tune")
    plot_history(history, run_dir / run.CURVES_FILE, best_row(history, kept))
    if not folder.multi_label:
        plot_confusion(final.result["confusion_matrix"], folder.classes,
                       run_dir / run.CONFUSION_FILE)
    metrics = record.to_json()
    build_report(run_dir, metrics)
    write_json(run_dir / run.METRICS_FILE, metrics)  # last: its presence marks a finished run
    return train_sha256


def _write_classes(run_dir: Path, folder: ImageFolder, final: FinalScores) -> None:
    from graftkit.outputs import run

    open_set = final.open_set
    run.write_predictions(run_dir / run.PREDICTIONS_FILE, folder.val.paths, folder.val.labels,
                          final.probs, folder.classes, final.ood, open_set.threshold)
    if final.test is not None:
        run.write_predictions(run_dir / run.TEST_PREDICTIONS_FILE, folder.test.paths,
                              folder.test.labels, final.test.probs, folder.classes,
                              final.test.ood, open_set.threshold)


def _write_label_sets(run_dir: Path, folder: ImageFolder, final: FinalScores) -> None:
    from graftkit.outputs import run
    from graftkit.outputs.multilabel import multi_hot
    from graftkit.outputs.plots import plot_pr_curves

    plot_pr_curves(multi_hot(folder.val.labels, len(folder.classes)), final.probs,
                   folder.classes, final.thresholds, run_dir / run.PR_CURVES_FILE)

    threshold = final.open_set.threshold
    run.write_label_set_predictions(run_dir / run.PREDICTIONS_FILE, folder.val.paths,
                                    folder.val.labels, final.probs, folder.classes,
                                    final.thresholds, final.ood, threshold)
    if final.test is not None:
        run.write_label_set_predictions(run_dir / run.TEST_PREDICTIONS_FILE, folder.test.paths,
                                        folder.test.labels, final.test.probs, folder.classes,
                                        final.thresholds, final.test.ood, threshold)

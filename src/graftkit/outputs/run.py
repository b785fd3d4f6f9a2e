"""The run folder: every output of ``graft fit`` and how to read it back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from graftkit.errors import RunError
from graftkit.files import atomic_write, write_text
from graftkit.outputs.record import RunRecord
from graftkit.task import SINGLE_LABEL

MODEL_FILE = "model.keras"



LABELS_FILE = "labels.json"



METRICS_FILE = "metrics.json"



# history.csv's columns: one row per epoch of either phase.
HISTORY_COLUMNS = SINGLE_LABEL.history_columns  # multi-label runs log mAP ("map") instead
HISTORY_FILE = "history.csv"



CURVES_FILE = "curves.png"



CONFUSION_FILE = "confusion_matrix.png"
PR_CURVES_FILE = "pr_curves.png"  # multi-label runs: a precision-recall curve per label



SPLIT_FILE = "split.json"  # the files of each split, for report, export and audits



PREDICTIONS_FILE = "predictions.csv"  # validation predictions of the final model
TEST_PREDICTIONS_FILE = "test_predictions.csv"  # the same for the held-out test images



OPEN_SET_FILE = "open_set.npz"  # the "unknown" score's statistics and threshold



RUN_MARKERS = (MODEL_FILE, METRICS_FILE)



def check_run_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that is a file or holds a finished run, touching nothing."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file: pass a folder path")
    unfinished = (path / ".checkpoint" / "state.json").is_file()  # resumable: not refused
    if path.is_dir() and not overwrite and not unfinished and any(
            (path / m).exists() for m in RUN_MARKERS):
        raise RunError(f"{path} already holds a run: pass --overwrite or choose another --out")
    return path



def prepare_run_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create ``out`` and prove it is writable before any training time is spent."""
    path = check_run_dir(out, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RunError(f"cannot write to {path}: {exc.strerror or exc}; choose another --out") from None
    return path



def write_history(path: Path, rows: list[dict], columns) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())



class HistoryLog:
    """``history.csv`` kept current during a run, as Keras' ``CSVLogger`` does.

    ``reset`` writes the rows so far (a fresh run, a resume, phase 1 run again); ``append``
    adds one row per epoch to the same file, so ``tail -f RUN/history.csv`` follows training.
    The finished run writes the file once more, whole.
    """

    def __init__(self, path: Path, columns):
        self.path, self.columns = Path(path), list(columns)

    def reset(self, rows: list[dict]) -> None:
        write_history(self.path, rows, self.columns)

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n").writerow(row)



def write_predictions(path: Path, paths, labels, probs, classes, ood_scores=None,
                      threshold: float | None = None) -> None:
    """One row per validation image: what the final model said, its loss on it, and its
    open-set score (``known``: at or below the run's threshold)."""
    import numpy as np

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", "probability", "true_probability", "loss",
                     "ood_score", "known"])
    if ood_scores is None:
        ood_scores = [None] * len(paths)
    for p, y, row, score in zip(paths, labels, probs, ood_scores):
        k = int(np.argmax(row))
        true_p = float(row[y])
        known = "" if score is None or threshold is None else str(bool(score <= threshold)).lower()
        writer.writerow([p, classes[y], classes[k], f"{row[k]:.6f}", f"{true_p:.6f}",
                         f"{-np.log(max(true_p, 1e-12)):.6f}",
                         "" if score is None else f"{score:.6g}", known])
    write_text(path, buf.getvalue())



def write_label_set_predictions(path: Path, paths, labels, probs, classes, thresholds,
                                ood_scores, threshold: float) -> None:
    """One row per image of a multi-label run: its labels, those the model gives it (above
    each label's threshold), the loss (binary cross-entropy, summed over the labels), the
    open-set score, and one probability column per label."""
    import numpy as np

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "labels", "predicted", "loss", "ood_score", "known",
                     *[f"p_{c}" for c in classes]])
    for p, y, row, score in zip(paths, labels, probs, ood_scores):
        truth = np.zeros(len(classes), bool)
        truth[list(y)] = True
        q = np.clip(row.astype(np.float64), 1e-12, 1 - 1e-12)
        loss = -float(np.where(truth, np.log(q), np.log(1 - q)).sum())
        said = [classes[j] for j in np.flatnonzero(row >= thresholds)]
        writer.writerow([p, " ".join(classes[j] for j in y), " ".join(said), f"{loss:.6f}",
                         f"{score:.6g}", str(bool(score <= threshold)).lower(),
                         *[f"{v:.6f}" for v in row]])
    write_text(path, buf.getvalue())


def read_predictions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise RunError(f"{path} is missing: the run predates it; run graft fit again")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))



def next_run_dir(run: Path) -> Path:
    """Where a refit of ``run`` goes: ``RUN-2``, ``RUN-3``... (``RUN-2``'s is ``RUN-3``); an
    unfinished one is taken again, so the same command after Ctrl-C resumes it."""
    stem, n = run.name, 2
    head, _, tail = stem.rpartition("-")
    if head and tail.isdigit():
        stem, n = head, int(tail) + 1
    while (run.parent / f"{stem}-{n}" / METRICS_FILE).exists():
        n += 1
    return run.parent / f"{stem}-{n}"


def read_split(run_dir: Path) -> dict:
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise RunError(f"{path} is missing: the run predates it; run graft fit again")
    return json.loads(path.read_text(encoding="utf-8"))



def save_model(model, path: Path) -> None:
    """The model alone: an uncompiled copy, so no optimizer state (3x the weights) is saved."""
    import keras

    plain = keras.Model.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    for src, dst in zip(model.layers, plain.layers):
        dst.trainable = src.trainable
    atomic_write(path, lambda tmp: plain.save(tmp))



def read_run(run_dir: str | os.PathLike) -> tuple[Path, list[str], RunRecord]:
    """``(model path, labels, record)`` of a finished run, or a clear error. A missing or
    unreadable ``metrics.json`` gives an empty record: the model still predicts."""
    path = Path(run_dir)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise RunError(f"{path} is not a graftkit run (no {MODEL_FILE}); pass the --out of graft fit")
    try:
        labels = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path / LABELS_FILE}: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels) or \
            len(set(labels)) != len(labels):
        raise RunError(f"{path / LABELS_FILE} must be a JSON list of distinct class names, "
                       "one per model output in training order")
    try:
        metrics = json.loads((path / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    return model_path, labels, RunRecord.from_json(metrics if isinstance(metrics, dict) else {})

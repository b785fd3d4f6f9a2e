"""The run folder: every output of ``graft fit``, each written atomically.

A file appears under its final name only once complete (temp file + rename), so an interrupted
run never leaves a half-written ``model.keras`` that looks valid.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
import uuid
from pathlib import Path

from graftkit.errors import DiskFullError, RunError, UsageError

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
SPLIT_FILE = "split.json"  # the files of each split, for report, export and audits
PREDICTIONS_FILE = "predictions.csv"  # validation predictions of the final model
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


def prepare_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """A file the user names, checked before the work that fills it: parent made, writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder: pass a file path, e.g. {path / 'out.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {option} {path}: {exc.strerror or exc}; choose another "
                         "path") from None
    return path


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (h5py, Keras' zip writer) wraps it in its own text."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _new_file(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file created as ``open()`` does (mode 0666 less the umask), unlike mkstemp's 0600.

    Run folders are read by colleagues, serving accounts and web servers: their files must
    have the permissions of any file the user writes.
    """
    for _ in range(100):
        name = folder / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(name)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a hidden temp file beside ``path``, then rename it into place.

    The temp name keeps every suffix (``.weights.h5``, ``.keras``), which Keras insists on. A
    full disk raises ``DiskFullError`` naming the folder; the file in place stays as it was.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    tmp = None
    try:
        tmp = _new_file(path.parent, f".{stem}-", "".join(path.suffixes))
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path.parent) from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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


def write_predictions(path: Path, paths, labels, probs, classes) -> None:
    """One row per validation image: what the final model said, and its loss on it."""
    import numpy as np

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", "probability", "true_probability", "loss"])
    for p, y, row in zip(paths, labels, probs):
        k = int(np.argmax(row))
        true_p = float(row[y])
        writer.writerow([p, classes[y], classes[k], f"{row[k]:.6f}", f"{true_p:.6f}",
                         f"{-np.log(max(true_p, 1e-12)):.6f}"])
    write_text(path, buf.getvalue())


def read_predictions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise RunError(f"{path} is missing: the run predates it; run graft fit again")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


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


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def best_row(rows: list[dict], phases=("head", "fine_tune")) -> int | None:
    """Index of the epoch whose weights a run keeps: best val accuracy, ties lower val loss."""
    best = None
    for i, r in enumerate(rows):
        if r["phase"] not in phases:
            continue
        key = (float(r["val_accuracy"]), -float(r["val_loss"]))
        if best is None or key > best[0]:
            best = (key, i)
    return None if best is None else best[1]


def plot_history(rows: list[dict], path: Path, best: int | None = None) -> None:
    """Loss and accuracy per epoch across both phases; the phase boundary and the kept epoch
    (``best``, an index into ``rows``) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = list(range(1, len(rows) + 1))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(steps, [r[key] for r in rows], "o-", label=f"train {key}")
        ax.plot(steps, [r[f"val_{key}"] for r in rows], "o-", label=f"val {key}")
        n_head = sum(r["phase"] == "head" for r in rows)
        if 0 < n_head < len(rows):
            ax.axvline(n_head + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        if best is not None:
            ax.plot([best + 1], [rows[best][f"val_{key}"]], "*", color="crimson", markersize=14,
                    label=f"kept: epoch {rows[best]['epoch']} ({rows[best]['phase']})")
        ax.set_xlabel("epoch (both phases)")
        ax.set_title(key)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_confusion(matrix, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black", fontsize=8)
    ax.set_title("validation confusion matrix")
    save_figure(fig, path)
    plt.close(fig)


def read_run(run_dir: str | os.PathLike) -> tuple[Path, list[str], dict]:
    """``(model path, labels, metrics)`` of a finished run, or a clear error."""
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
    return model_path, labels, metrics

"""Scores of a classifier on labelled images: accuracy, per-class figures, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graftkit import defaults


def probabilities(model, paths: Sequence[str], batch_size: int = defaults.BATCH_SIZE, tta: bool = False,
                  progress=None, fast=None) -> np.ndarray:
    """Class probabilities for image files, through the same decoder as training.

    ``tta`` averages the prediction of each image and of its mirror image (test-time
    augmentation); ``progress(done, total)`` is called after every chunk. ``fast`` is a
    ``features.SplitClassifier`` of ``model`` (the same function, up to twice the images/s:
    a compiled Keras bottom, or the TFLite engine when cached or worth converting).
    """
    return model_outputs(model, paths, batch_size, tta, progress, fast)[-1]


def model_outputs(model, paths: Sequence[str], batch_size: int = defaults.BATCH_SIZE,
                  tta: bool = False, progress=None, fast=None,
                  unreadable: dict[int, str] | None = None) -> list[np.ndarray]:
    """Every output of ``model`` for image files (probabilities last), as ``probabilities``.

    With ``tta`` only the last output (the probabilities) is averaged with the mirror image's;
    the others (e.g. ``graft.with_features``' features) are those of the image itself. With
    ``unreadable`` (a dict to fill; needs ``fast``), a file that does not decode is left out
    of the outputs and recorded there by its position, with the reason.
    """
    from graftkit.data.pipeline import make_dataset

    paths = list(paths)
    empty = [np.zeros((0, o.shape[-1]), dtype=np.float32) for o in model.outputs]
    if not paths:
        return empty
    size = int(model.inputs[0].shape[1])
    if fast is not None:  # converts the engine only for a job that pays for it
        fast.plan(len(paths) * (2 if tta else 1))
        return _fast_outputs(fast, paths, size, tta, progress, unreadable) or empty
    assert unreadable is None, "the Keras pipeline needs files checked first"
    chunk = batch_size * 8
    out = []
    for start in range(0, len(paths), chunk):
        ds = make_dataset(paths[start: start + chunk], None, size, batch_size)
        outs = _as_list(model.predict(ds, verbose=0))
        if tta:
            flipped = ds.map(lambda x: x[:, :, ::-1, :])
            outs[-1] = (outs[-1] + _as_list(model.predict(flipped, verbose=0))[-1]) / 2
        out.append(outs)
        if progress:
            progress(min(start + chunk, len(paths)), len(paths))
    return [np.concatenate(col) for col in zip(*out)]


def _fast_outputs(fast, paths: list[str], size: int, tta: bool, progress,
                  unreadable: dict[int, str] | None) -> list[np.ndarray] | None:
    """``model_outputs`` through a ``SplitClassifier``, decoding two chunks ahead on every core.

    The chunks are small, so that decoding overlaps the engine from the first images on (with
    chunks of 256, most of a 400-image job decoded while the engine waited), and a multiple of
    the Keras part's batch, so each row shares its batch with the same rows as in one call
    (an unreadable file left out shifts the rows after it, as if it had never been given)."""
    from graftkit.data.images import decode_checked, load_image
    from graftkit.data.pipeline import prefetched
    from graftkit.frozen.engine import KERAS_BATCH

    chunk = 2 * KERAS_BATCH
    out, ready = [], []

    def run(rows: list[np.ndarray]) -> None:
        x = np.stack(rows, dtype=np.float32)
        outs = fast.outputs(x)
        if tta:
            outs[-1] = (outs[-1] + fast(x[:, :, ::-1])) / 2
        out.append(outs)

    decode = (lambda p: load_image(p, size)) if unreadable is None else (
        lambda p: decode_checked(p, size))
    done = 0
    for part in prefetched(decode, paths, chunk):
        for _, pixels in part:
            if isinstance(pixels, str):
                assert unreadable is not None
                unreadable[done] = pixels
            else:
                ready.append(pixels)
            done += 1
        while len(ready) >= chunk:
            run(ready[:chunk])
            del ready[:chunk]
            if progress:
                progress(done - len(ready), len(paths))
    if ready:
        run(ready)
    if progress and (ready or not out):
        progress(done, len(paths))
    return [np.concatenate(col) for col in zip(*out)] if out else None


def inputs_outputs(model, inputs, batch_size: int, tta: bool, progress, fast,
                   run_pixels) -> list[np.ndarray]:
    """Every output of ``model`` for an ``Inputs`` list, files and images in memory alike.

    Unchecked files are decoded once, by the engine's loop when there is one (those that fail
    leave ``inputs`` for its ``skipped``); ``run_pixels(x)`` scores stacked pixels."""
    if inputs.unchecked and fast is None:
        inputs.checked()
    unreadable: dict[int, str] | None = {} if inputs.unchecked else None
    files = [i for i, p in enumerate(inputs.paths) if p is not None]
    scored = None
    if files or not inputs.paths:  # no image at all: still the outputs' shapes
        scored = model_outputs(model, [inputs.paths[i] for i in files], batch_size, tta,
                               progress, fast, unreadable)
    if unreadable:  # gone from the rows before they are laid out
        inputs.drop({files[j]: reason for j, reason in unreadable.items()})
    inputs.unchecked = False
    files = [i for i, p in enumerate(inputs.paths) if p is not None]
    held = [i for i, p in enumerate(inputs.paths) if p is None]
    parts = [(files, scored)] if scored is not None else []
    if held:
        x = np.stack([inputs.pixels[i] for i in held]).astype(np.float32)
        outs = run_pixels(x)
        if tta:  # as model_outputs does for files: the mirror image's probabilities too
            mirrored = run_pixels(np.ascontiguousarray(x[:, :, ::-1]))
            outs = [*outs[:-1], (outs[-1] + mirrored[-1]) / 2]
        parts.append((held, outs))
    merged = [np.zeros((len(inputs.names), *o.shape[1:]), o.dtype) for o in parts[0][1]]
    for rows, outs in parts:
        for whole, part in zip(merged, outs):
            whole[rows] = part
    return merged


def _as_list(outputs) -> list[np.ndarray]:
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


def scores(labels_true: Sequence[int], probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(labels_true)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = support > 0
    return {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        # mean recall over the classes present: what accuracy hides when classes are imbalanced
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "num_images": int(len(y_true)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }

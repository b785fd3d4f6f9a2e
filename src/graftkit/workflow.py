"""``fit``: the whole pipeline in one call (data -> base -> graft -> phases -> scores -> run)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graftkit import defaults
from graftkit.errors import UsageError


@dataclass
class FitResult:
    """What ``fit`` produced: the trained model, its metrics and where the run was written."""

    model: object
    metrics: dict
    run_dir: Path
    classes: list[str]


def _check_options(image_size, batch_size, head_epochs, fine_tune_epochs, lr, fine_tune_lr,
                   unfreeze, dropout) -> int | str:
    if image_size is not None and image_size < 8:
        raise UsageError(f"--image-size must be at least 8 (got {image_size})")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if head_epochs < 1:
        raise UsageError(f"--head-epochs must be at least 1 (got {head_epochs})")
    if fine_tune_epochs < 0:
        raise UsageError(f"--fine-tune-epochs must be 0 or more (got {fine_tune_epochs})")
    for name, value in (("--lr", lr), ("--fine-tune-lr", fine_tune_lr)):
        if not 0 < value < 1:
            raise UsageError(f"{name} must be between 0 and 1 (got {value})")
    if not 0 <= dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1) (got {dropout})")
    if str(unfreeze) == "all":
        return "all"
    try:
        n = int(unfreeze)
    except ValueError:
        raise UsageError(f"--unfreeze must be 'all' or a number of blocks (got {unfreeze!r})") from None
    if n < 1:
        raise UsageError(f"--unfreeze must be 'all' or at least 1 (got {n})")
    return n


def fit(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    base: str = defaults.DEFAULT_BACKBONE,
    weights: str | None = "imagenet",
    image_size: int | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    head_epochs: int = defaults.HEAD_EPOCHS,
    fine_tune_epochs: int = defaults.FINE_TUNE_EPOCHS,
    unfreeze: int | str = defaults.UNFREEZE,
    lr: float = defaults.HEAD_LR,
    fine_tune_lr: float = defaults.FINE_TUNE_LR,
    augment: str | dict | None = None,
    augment_head: bool = False,
    val_split: float = defaults.VAL_SPLIT,
    seed: int = defaults.SEED,
    dropout: float = defaults.DROPOUT,
    overwrite: bool = False,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> FitResult:
    """Fine-tune a pretrained base on an image folder and write a run folder.

    Args:
        data_dir: one subfolder per class, or ``train/`` and ``val/`` folders of them.
        out: the run folder to write (refused if it holds a run, unless ``overwrite``).
        base: a backbone name (``graft backbones``) or a ``.keras`` model file.
        weights: ``"imagenet"``, ``None`` for random, or a local weights file.
        augment: None for the defaults, ``"none"``, a spec like ``"flip,zoom=0.2"``, or a dict.
        augment_head: augment in phase 1 too; the frozen base then runs every epoch instead
            of once (phase 1 otherwise trains the head on features computed once).
        unfreeze: ``"all"`` or the number of top blocks to fine-tune.

    Example:
        >>> result = graftkit.fit("photos/", out="runs/photos")  # doctest: +SKIP
        >>> result.metrics["val_accuracy"]  # doctest: +SKIP
    """
    from graftkit.data import parse_augment
    from graftkit.run import prepare_run_dir

    unfreeze = _check_options(image_size, batch_size, head_epochs, fine_tune_epochs, lr,
                              fine_tune_lr, unfreeze, dropout)
    settings = augment if isinstance(augment, dict) else parse_augment(augment)
    created = not Path(out).exists()
    run_dir = prepare_run_dir(out, overwrite)
    try:
        return _fit(data_dir, run_dir, base, weights, image_size, batch_size, head_epochs,
                    fine_tune_epochs, unfreeze, lr, fine_tune_lr, settings, augment_head,
                    val_split, seed, dropout, verbose, log)
    except BaseException:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # leave no empty folder behind a run that wrote nothing
        raise


def _fit(data_dir, run_dir, base, weights, image_size, batch_size, head_epochs, fine_tune_epochs,
         unfreeze, lr, fine_tune_lr, settings, augment_head, val_split, seed, dropout, verbose,
         log) -> FitResult:
    from graftkit.data import augmenter, make_dataset, scan

    started = time.perf_counter()

    folder = scan(data_dir, val_split, seed)
    log(f"data: {len(folder.classes)} classes, {len(folder.train)} training and "
        f"{len(folder.val)} validation images ({folder.split_source}); "
        f"{len(folder.skipped)} files skipped")
    for item in folder.skipped[:10]:
        log(f"  skipped {item['path']}: {item['reason']}")
    if len(folder.skipped) > 10:
        log(f"  ... and {len(folder.skipped) - 10} more (see metrics.json skipped_files)")

    import keras

    from graftkit.backbones import load_base
    from graftkit.graft import build_classifier
    from graftkit.schedule import Best, Schedule, fine_tune, train_head, train_head_on_features

    keras.utils.set_random_seed(seed)
    base_model, info = load_base(base, image_size, weights)
    model = build_classifier(base_model, len(folder.classes), dropout)
    size = info.image_size
    log(f"base: {info.name} at {size}x{size} (preprocessing {info.preprocessing})")

    aug = augmenter(settings, seed) if settings else None
    train_ds = make_dataset(folder.train.paths, folder.train.labels, size, batch_size,
                            shuffle=True, augment=aug, seed=seed)
    val_ds = make_dataset(folder.val.paths, folder.val.labels, size, batch_size)
    schedule = Schedule(head_epochs, fine_tune_epochs, lr, fine_tune_lr, unfreeze,
                        verbose=verbose)
    best = Best()
    if aug is None or not augment_head:
        log("phase 1: head on features computed once by the frozen base (no augmentation)")
        plain = (make_dataset(folder.train.paths, None, size, batch_size), folder.train.labels)
        val_images = (make_dataset(folder.val.paths, None, size, batch_size), folder.val.labels)
        phases = [train_head_on_features(model, base_model, plain, val_images, schedule, best,
                                         batch_size)]
    else:
        log(f"phase 1: head on the frozen base, augmentation {settings}")
        phases = [train_head(model, base_model, train_ds, val_ds, schedule, best)]
    if fine_tune_epochs > 0:
        log(f"phase 2: fine-tuning {unfreeze if unfreeze == 'all' else f'top {unfreeze} blocks'} "
            f"of the base at lr {fine_tune_lr:g}, BatchNormalization frozen")
        phases.append(fine_tune(model, base_model, info.block_pattern, train_ds, val_ds,
                                schedule, best))

    return _write_run(run_dir, model, folder, info, phases, schedule, settings, started,
                      dict(base=base, weights=str(weights), batch_size=batch_size, lr=lr,
                           fine_tune_lr=fine_tune_lr, unfreeze=unfreeze, seed=seed,
                           dropout=dropout, val_split=val_split))


def _write_run(run_dir, model, folder, info, phases, schedule, settings, started, options):
    import keras
    import tensorflow as tf

    from graftkit import __version__
    from graftkit.evaluate import predict_proba, scores
    from graftkit.run import (
        CONFUSION_FILE,
        CURVES_FILE,
        HISTORY_FILE,
        LABELS_FILE,
        METRICS_FILE,
        MODEL_FILE,
        plot_confusion,
        plot_history,
        save_model,
        write_history,
        write_json,
    )
    from graftkit.schedule import HISTORY_COLUMNS

    probs = predict_proba(model, folder.val.paths)
    result = scores(folder.val.labels, probs, folder.classes)
    metrics = {
        "val_accuracy": result["accuracy"],
        "backbone": info.name,
        "image_size": info.image_size,
        "preprocessing": info.preprocessing,
        "classes": folder.classes,
        "num_train": len(folder.train),
        "num_val": len(folder.val),
        "split": folder.split_source,
        "skipped_files": folder.skipped,
        "phases": [
            {"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 2),
             "best_val_accuracy": p.best_val_accuracy, "note": p.note}
            for p in phases
        ],
        "total_seconds": round(time.perf_counter() - started, 2),
        "augmentation": settings,
        "options": options,
        "per_class": result["per_class"],
        "confusion_matrix": result["confusion_matrix"],
        "versions": {"graftkit": __version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__, "python": platform.python_version()},
    }
    save_model(model, run_dir / MODEL_FILE)
    write_json(run_dir / LABELS_FILE, folder.classes)
    write_history(run_dir / HISTORY_FILE, schedule.history, HISTORY_COLUMNS)
    plot_history(schedule.history, run_dir / CURVES_FILE)
    plot_confusion(result["confusion_matrix"], folder.classes, run_dir / CONFUSION_FILE)
    write_json(run_dir / METRICS_FILE, metrics)  # last: its presence marks a finished run
    return FitResult(model, metrics, run_dir, folder.classes)

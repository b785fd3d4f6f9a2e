"""The two phases: train the head on a frozen base, then fine-tune at a low learning rate.

Phase 1 runs on features computed once by the frozen base whenever training images are not
augmented (the guide's "feature extraction" variant: the same answer, for one pass of the base
instead of one per epoch). Phase 2 unfreezes all or the top blocks of the base with
BatchNormalization kept frozen, and ``KeepBest`` makes sure the final weights are the best seen
on validation across both phases, so fine-tuning can never leave a worse model than phase 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from graftkit.graft import HEAD_DENSE, build_head, freeze, unfreeze

LOSS = "sparse_categorical_crossentropy"
METRICS = ["accuracy"]
HISTORY_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


@dataclass
class PhaseResult:
    name: str  # "head" or "fine_tune"
    epochs: int
    seconds: float
    best_val_accuracy: float
    note: str = ""


@dataclass
class Best:
    """Best validation score seen so far, with the weights that gave it."""

    val_accuracy: float = -1.0
    val_loss: float = float("inf")
    weights: list[np.ndarray] | None = None

    def beaten_by(self, acc: float, loss: float) -> bool:
        return acc > self.val_accuracy or (acc == self.val_accuracy and loss < self.val_loss)


class KeepBest(keras.callbacks.Callback):
    """Track the best epoch by val accuracy (ties: lower val loss); restore it at the end.

    Unlike ``EarlyStopping(restore_best_weights=True)`` it starts from a previous phase's best,
    so a phase that never improves hands back the earlier weights untouched.
    """

    def __init__(self, best: Best, patience: int | None = None, target: keras.Model | None = None):
        super().__init__()
        self.best = best
        self.patience = patience
        self.target = target  # whose weights to keep, when not the model being fit
        self.wait = 0

    def _owner(self) -> keras.Model:
        return self.target or self.model

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        acc, loss = float(logs["val_accuracy"]), float(logs["val_loss"])
        if self.best.beaten_by(acc, loss):
            self.best.val_accuracy, self.best.val_loss = acc, loss
            self.best.weights = self._owner().get_weights()
            self.wait = 0
        else:
            self.wait += 1
            if self.patience is not None and self.wait >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best.weights is not None:
            self._owner().set_weights(self.best.weights)


class EpochLog(keras.callbacks.Callback):
    """One history row per epoch, with its phase and wall seconds."""

    def __init__(self, phase: str, rows: list[dict]):
        super().__init__()
        self.phase, self.rows = phase, rows

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"phase": self.phase, "epoch": epoch + 1}
        for key in HISTORY_COLUMNS[2:-1]:
            row[key] = float(logs[key]) if key in logs else float("nan")
        row["seconds"] = round(time.perf_counter() - self._start, 3)
        self.rows.append(row)


@dataclass
class Schedule:
    """Phase settings, as the user gave them (see ``graftkit.defaults`` for the defaults)."""

    head_epochs: int
    fine_tune_epochs: int
    head_lr: float
    fine_tune_lr: float
    unfreeze: int | str
    patience: int | None = 3
    verbose: int | str = "auto"
    class_weight: dict[int, float] | None = None
    checkpoint: object | None = None  # graftkit.checkpoint.RunCheckpoint
    tensorboard_dir: Path | None = None  # one sub-folder of logs per phase
    history: list[dict] = field(default_factory=list)


def _compile(model: keras.Model, lr: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=LOSS, metrics=METRICS)


def _tensorboard(schedule: Schedule, phase: str) -> list:
    if schedule.tensorboard_dir is None:
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(schedule.tensorboard_dir / phase))]


def _phase_seconds(schedule: Schedule, phase: str) -> float:
    return sum(r["seconds"] for r in schedule.history if r["phase"] == phase)


def _fit_phase(model, phase: str, train_ds, val_ds, epochs: int, schedule: Schedule, best: Best,
               patience: int | None) -> int:
    """``model.fit`` for one phase, resuming from the checkpoint's last epoch; epochs done."""
    keep = KeepBest(best, patience)
    callbacks = [EpochLog(phase, schedule.history), keep, *_tensorboard(schedule, phase)]
    initial_epoch = 0
    ckpt = schedule.checkpoint
    if ckpt is not None:
        from graftkit.checkpoint import EpochCheckpoint

        if ckpt.state.get("phase") == phase and ckpt.state.get("epoch", 0) > 0:
            ckpt.load_last(model)
            initial_epoch = ckpt.state["epoch"]
            keep.wait = ckpt.state.get("wait", 0)
        callbacks.append(EpochCheckpoint(ckpt, phase, schedule.history, keep))
    if initial_epoch >= epochs or (patience is not None and keep.wait >= patience):
        model.set_weights(best.weights)  # the phase had ended before the interruption
        return initial_epoch
    hist = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
        verbose=schedule.verbose, shuffle=False,  # the dataset shuffles itself
        class_weight=schedule.class_weight, callbacks=callbacks,
    )
    return initial_epoch + len(hist.epoch)


def train_head(model, base, train_ds, val_ds, schedule: Schedule, best: Best) -> PhaseResult:
    """Phase 1 through the frozen base, epoch by epoch (needed when images are augmented)."""
    freeze(base)
    _compile(model, schedule.head_lr)
    done = _fit_phase(model, "head", train_ds, val_ds, schedule.head_epochs, schedule, best, None)
    return PhaseResult("head", done, _phase_seconds(schedule, "head"), best.val_accuracy,
                       "through the frozen base every epoch (augmented)")


def train_head_on_features(model, base, train, val, schedule: Schedule, best: Best,
                           batch_size: int) -> PhaseResult:
    """Phase 1 on features computed once: the frozen base runs once per image, not per epoch.

    ``train`` and ``val`` are ``(unshuffled image dataset, labels)`` pairs. Its epochs take a
    fraction of a second, so an interrupted phase 1 simply runs again.
    """
    freeze(base)
    start = time.perf_counter()
    x_train, y_train = base.predict(train[0], verbose=0), np.asarray(train[1])
    x_val, y_val = base.predict(val[0], verbose=0), np.asarray(val[1])
    extract_seconds = time.perf_counter() - start
    dense = model.get_layer(HEAD_DENSE)
    head = build_head(x_train.shape[1], dense.units, model.get_layer("head_dropout").rate)
    _compile(head, schedule.head_lr)
    rows_before = len(schedule.history)
    head_best = Best()
    hist = head.fit(
        x_train, y_train, validation_data=(x_val, y_val), epochs=schedule.head_epochs,
        batch_size=batch_size, shuffle=True, verbose=schedule.verbose,
        class_weight=schedule.class_weight,
        callbacks=[EpochLog("head", schedule.history), KeepBest(head_best),
                   *_tensorboard(schedule, "head")],
    )
    # The first epoch's row carries the one-off cost of computing the features.
    if len(schedule.history) > rows_before:
        schedule.history[rows_before]["seconds"] = round(
            schedule.history[rows_before]["seconds"] + extract_seconds, 3)
    dense.set_weights(head.get_layer(HEAD_DENSE).get_weights())
    best.val_accuracy, best.val_loss = head_best.val_accuracy, head_best.val_loss
    best.weights = model.get_weights()
    return PhaseResult("head", len(hist.epoch), time.perf_counter() - start, best.val_accuracy,
                       "on cached features (no augmentation: same result, base run once)")


def fine_tune(model, base, block_pattern: str, train_ds, val_ds, schedule: Schedule,
              best: Best) -> PhaseResult:
    """Phase 2: unfreeze, recompile at a low rate, keep the best weights of both phases."""
    counts = unfreeze(base, schedule.unfreeze, keep_bn_frozen=True, block_pattern=block_pattern)
    _compile(model, schedule.fine_tune_lr)  # trainable changed: only a compile makes it count
    done = _fit_phase(model, "fine_tune", train_ds, val_ds, schedule.fine_tune_epochs, schedule,
                      best, schedule.patience)
    n = counts.unfrozen_blocks
    note = (f"unfroze {n} block{'' if n == 1 else 's'} ({counts.trainable:,} trainable parameters), "
            "BatchNormalization frozen")
    freeze(base)  # the saved model comes back frozen, as it was after phase 1
    return PhaseResult("fine_tune", done, _phase_seconds(schedule, "fine_tune"),
                       best.val_accuracy, note)

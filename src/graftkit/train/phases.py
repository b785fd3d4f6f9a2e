"""The two phases: train the head on a frozen base, then fine-tune at a low learning rate.

Phase 1 runs on features computed once by the frozen base (the guide's "feature extraction"
variant), per image and per cached augmented view (``graftkit.frozen``). Phase 2 unfreezes
the top blocks (trained on cached activations at the cut, since everything below is frozen)
or all of the base (trained on images), with BatchNormalization kept frozen; ``KeepBest`` makes
sure the final weights are the best seen on validation across both phases, so fine-tuning can
never leave a worse model than phase 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import keras
import numpy as np

from graftkit import defaults
from graftkit.graft import HEAD_DENSE, HEAD_DROPOUT, build_head, freeze, unfreeze
from graftkit.outputs.run import HistoryLog  # history.csv: a row per epoch
from graftkit.task import SINGLE_LABEL, Task
from graftkit.train.optimizer import Training, block_factors, loss, optimizer

if TYPE_CHECKING:
    from graftkit.frozen.rows import DiskRows
    from graftkit.train.checkpoint import RunCheckpoint


@dataclass
class PhaseResult:
    name: str  # "head" or "fine_tune"
    epochs: int
    seconds: float
    best_val_accuracy: float
    note: str = ""
    improved: bool = True  # beat the phase before it on validation (so its weights are kept)


@dataclass
class Best:
    """Best validation score seen so far (accuracy, or mAP for label sets), with the weights
    that gave it."""

    val_accuracy: float = -1.0
    val_loss: float = float("inf")
    weights: list[np.ndarray] | None = None

    def beaten_by(self, acc: float, loss: float) -> bool:
        return acc > self.val_accuracy or (acc == self.val_accuracy and loss < self.val_loss)


class KeepBest(keras.callbacks.Callback):
    """Track the best epoch by the task's validation score (ties: lower val loss); restore it
    at the end.

    Unlike ``EarlyStopping(restore_best_weights=True)`` it starts from a previous phase's best,
    so a phase that never improves hands back the earlier weights untouched.
    """

    def __init__(self, best: Best, patience: int | None = None, target: keras.Model | None = None,
                 monitor: str = "accuracy"):
        super().__init__()
        self.best = best
        self.monitor = f"val_{monitor}"
        self.patience = patience
        self.target = target  # whose weights to keep, when not the model being fit
        self.wait = 0

    def _owner(self) -> keras.Model:
        return self.target or self.model

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        acc, loss = float(logs[self.monitor]), float(logs["val_loss"])
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

    def __init__(self, phase: str, rows: list[dict], first_epoch: int = 0, sink=None,
                 columns: tuple[str, ...] = SINGLE_LABEL.history_columns):
        super().__init__()
        self.phase, self.rows, self.first_epoch = phase, rows, first_epoch
        self.columns = columns
        self.sink = sink  # e.g. graftkit.outputs.run.HistoryLog: each row on disk as the epoch ends

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"phase": self.phase, "epoch": self.first_epoch + epoch + 1}
        for key in self.columns[2:-1]:
            row[key] = float(logs[key]) if key in logs else float("nan")
        row["seconds"] = round(time.perf_counter() - self._start, 3)
        self.rows.append(row)
        if self.sink is not None:
            self.sink.append(row)


@dataclass
class PhasePlan:
    """Phase settings, as the user gave them (see ``graftkit.defaults`` for the defaults)."""

    head_epochs: int
    fine_tune_epochs: int
    head_lr: float | str  # "auto" until the range test sets it
    fine_tune_lr: float | str
    unfreeze: int | str
    patience: int | None = defaults.PATIENCE
    verbose: int | str = "auto"
    class_weight: dict[int, float] | None = None
    checkpoint: RunCheckpoint | None = None
    tensorboard_dir: Path | None = None  # one sub-folder of logs per phase
    whole_batches: bool = False  # several replicas: every training batch full (each gets a part)
    val_batch_size: int | None = None  # several replicas: see distribute.eval_batch_size
    training: Training = field(default_factory=Training)
    deadline: float | None = None  # time.perf_counter() past which no fine-tuning epoch runs
    heads: int = 1  # phase 1 on features: heads trained from different seeds, then averaged
    head_steps: int = 0  # phase 1 on features: steps an epoch, when more than one pass (0: one)
    history: list[dict] = field(default_factory=list)
    history_log: HistoryLog | None = None  # history.csv of the run folder
    task: Task = SINGLE_LABEL


def _compile(model: keras.Model, lr: float, plan: PhasePlan, total_steps: int = 0,
             factors: dict | None = None) -> None:
    """A fresh optimizer for a phase of ``total_steps`` steps (0: a constant rate)."""
    training = plan.training
    if not total_steps:
        training = replace(training, schedule="constant")
    model.compile(optimizer=optimizer(lr, total_steps, training, model.trainable_variables,
                                      factors),
                  loss=_loss(plan), metrics=plan.task.metrics(int(model.outputs[0].shape[-1])))
    # Its slot variables made now, eagerly: built inside fit's first trace, each is lifted out
    # of the graph one by one (3.6 s against 0.4 s for EfficientNet-Lite0's 147 variables).
    model.optimizer.build(model.trainable_variables)


def _loss(plan: PhasePlan):
    """Cross-entropy over the classes, or binary cross-entropy per label (label sets)."""
    smoothing = plan.training.label_smoothing
    if plan.task.multi_label:
        return keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    return loss(smoothing)


def _batches(ds) -> int:
    """Batches per epoch of a finite dataset (0 when unknown: the rate stays constant)."""
    n = int(ds.cardinality()) if hasattr(ds, "cardinality") else -1
    return max(n, 0)


class TimeBudget(keras.callbacks.Callback):
    """Stop training before an epoch that would end past ``deadline`` (a perf_counter time).

    The estimate is the last epoch's duration; within the first epoch, the rate of its batches.
    A stopped epoch is still validated, so ``KeepBest`` sees it.
    """

    def __init__(self, deadline: float, steps_per_epoch: int | None):
        super().__init__()
        self.deadline, self.steps = deadline, steps_per_epoch
        self.last_epoch: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if self.last_epoch is not None and self._start + self.last_epoch > self.deadline:
            self._stop()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.last_epoch is None and self.steps and batch >= 1:
            if self._start + (now - self._start) / (batch + 1) * self.steps > self.deadline:
                self._stop()
        elif now > self.deadline:
            self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = time.perf_counter() - self._start

    def _stop(self):
        self.model.stop_training = True


def _tensorboard(plan: PhasePlan, phase: str) -> list:
    if plan.tensorboard_dir is None:
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(plan.tensorboard_dir / phase))]


def _phase_seconds(plan: PhasePlan, phase: str) -> float:
    return sum(r["seconds"] for r in plan.history if r["phase"] == phase)


def _fit_phase(model, phase: str, train_ds, val_ds, epochs: int, plan: PhasePlan, best: Best,
               patience: int | None, target: keras.Model | None = None,
               steps_per_epoch: int | None = None) -> int:
    """``model.fit`` for one phase, resuming from the checkpoint's last epoch; epochs done.

    ``train_ds`` is a dataset, or a function of the first epoch that makes an endless one (then
    ``steps_per_epoch`` is needed). ``target`` is the model whose weights ``best`` holds, when
    ``model`` trains only part of it.
    """
    keep = KeepBest(best, patience, target, plan.task.monitor)
    callbacks = [EpochLog(phase, plan.history, sink=plan.history_log,
                          columns=plan.task.history_columns), keep,
                 *_tensorboard(plan, phase)]
    if plan.deadline is not None and phase == "fine_tune":
        callbacks.insert(0, TimeBudget(plan.deadline, steps_per_epoch or _batches(
            train_ds if not callable(train_ds) else None)))
    initial_epoch = 0
    ckpt = plan.checkpoint
    if ckpt is not None:
        from graftkit.train.checkpoint import EpochCheckpoint

        if ckpt.state.get("phase") == phase and ckpt.state.get("epoch", 0) > 0:
            ckpt.load_last(model)
            initial_epoch = ckpt.state["epoch"]
            keep.wait = ckpt.state.get("wait", 0)
        callbacks.append(EpochCheckpoint(ckpt, phase, plan.history, keep))
    if initial_epoch >= epochs or (patience is not None and keep.wait >= patience):
        (target or model).set_weights(best.weights)  # the phase had ended before the interruption
        return initial_epoch
    endless = callable(train_ds)
    hist = model.fit(
        train_ds(initial_epoch) if endless else train_ds, validation_data=val_ds,
        epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
        verbose=plan.verbose, shuffle=False,  # the dataset shuffles itself
        class_weight=None if endless else plan.class_weight,  # endless: sample weights
        callbacks=callbacks,
    )
    return initial_epoch + len(hist.epoch)


def train_head(model, base, train_ds, val_ds, plan: PhasePlan, best: Best) -> PhaseResult:
    """Phase 1 through the frozen base, epoch by epoch (needed when images are augmented)."""
    freeze(base)
    _compile(model, cast(float, plan.head_lr), plan, _batches(train_ds) * plan.head_epochs)
    done = _fit_phase(model, "head", train_ds, val_ds, plan.head_epochs, plan, best, None)
    return PhaseResult("head", done, _phase_seconds(plan, "head"), best.val_accuracy,
                       "through the frozen base every epoch (augmented)")


def view_cycle(views: list, labels, batch_size: int, seed: int,
               class_weight: dict[int, float] | None = None, initial_epoch: int = 0,
               whole_batches: bool = False):
    """Cached rows for training: epoch ``e`` draws view ``e % len(views)`` of every image.

    With as many views as epochs this is per-epoch augmentation, paid once. The shuffle is
    seeded by the epoch, so a resumed phase replays exactly. Class weights become sample
    weights. An endless tf.data stream (1.5x Keras' own numpy path here); ``fit`` needs
    ``steps_per_epoch=steps(len(labels), batch_size, whole_batches)``. ``whole_batches`` drops
    each epoch's last partial batch (replicas must not get empty ones; the shuffle changes
    which rows wait for the next epoch).
    """
    import tensorflow as tf

    from graftkit.data.pipeline import as_targets, shard_by_data

    y = as_targets(labels)
    w = None if class_weight is None else np.array(
        [class_weight[int(label)] for label in labels], dtype=np.float32)
    n, count = len(labels), len(views)
    shape, y_type, y_shape = tuple(views[0].shape[1:]), tf.as_dtype(y.dtype), (None, *y.shape[1:])

    def rows_of(view, rows):  # reads the cached rows in place (memory or disk): no second copy
        rows = np.sort(rows)
        return np.asarray(views[int(view)][rows], dtype=np.float32), y[rows], (
            w[rows] if w is not None else np.ones(len(rows), np.float32))

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), e]))
        view = tf.math.floormod(e, count)

        def batch(rows):
            xb, yb, wb = tf.numpy_function(rows_of, [view, rows],
                                           (tf.float32, y_type, tf.float32))
            xb.set_shape((None, *shape))
            yb.set_shape(y_shape)
            wb.set_shape((None,))
            return (xb, yb) if w is None else (xb, yb, wb)

        return tf.data.Dataset.from_tensor_slices(order).batch(
            batch_size, drop_remainder=whole_batches).map(batch)

    ds = tf.data.Dataset.range(initial_epoch, 1 << 30).flat_map(epoch)
    # A fixed prefetch, not AUTOTUNE: the autotuner's thread of an endless stream sleeps up to
    # a minute before the stream can be deleted, and fit() waits for it at the end of a phase.
    options = tf.data.Options()
    options.autotune.enabled = False
    return shard_by_data(ds.prefetch(2).with_options(options))


def steps(n: int, batch_size: int, whole_batches: bool = False) -> int:
    return max(1, n // batch_size) if whole_batches else -(-n // batch_size)


def head_schedule(requested: int | str, n: int, batch_size: int,
                  whole_batches: bool = False) -> tuple[int, int]:
    """``(epochs, steps an epoch)`` of a head on ``n`` cached rows: as requested, one pass an
    epoch; for "auto" ``defaults.HEAD_EPOCHS`` epochs of at least ``defaults.MIN_HEAD_STEPS``
    steps in all, so that a small set gets several passes an epoch (its steps cost little, a
    validation pass costs more)."""
    per_pass = steps(n, batch_size, whole_batches)
    if requested != "auto":
        return int(requested), per_pass
    return defaults.HEAD_EPOCHS, max(per_pass, -(-defaults.MIN_HEAD_STEPS // defaults.HEAD_EPOCHS))


def _cycle(views: list, labels, batch_size: int, seed: int, plan: PhasePlan,
           initial_epoch: int = 0):
    """``view_cycle`` with the plan's class weights and batching rule."""
    return view_cycle(views, labels, batch_size, seed, plan.class_weight, initial_epoch,
                      plan.whole_batches)


def _head_like(model, feature_dim: int) -> keras.Model:
    """A stand-alone head shaped like ``model``'s, for training on pooled features."""
    dense = model.get_layer(HEAD_DENSE)
    return build_head(feature_dim, dense.units, model.get_layer(HEAD_DROPOUT).rate,
                      dense.activation.__name__)


def _rows(x, y, batch_size: int):
    """Validation rows as float32 batches, through tf.data (faster than Keras' numpy path).

    ``x`` is an array or anything indexable by row numbers (``features.DiskRows``).
    """
    import tensorflow as tf

    from graftkit.data.pipeline import as_targets, shard_by_data

    y = as_targets(y)
    if isinstance(x, np.ndarray):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return shard_by_data(ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32), b)))
    shape, y_type, y_shape = tuple(x.shape[1:]), tf.as_dtype(y.dtype), (None, *y.shape[1:])

    def rows_of(rows):
        return np.asarray(x[rows], dtype=np.float32), y[rows]

    def batch(rows):
        xb, yb = tf.numpy_function(rows_of, [rows], (tf.float32, y_type))
        xb.set_shape((None, *shape))
        yb.set_shape(y_shape)
        return xb, yb

    ds = tf.data.Dataset.range(len(y)).batch(batch_size).map(batch)
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def train_head_on_features(model, train_views: list[np.ndarray], y_train, val_features, y_val,
                           plan: PhasePlan, best: Best, batch_size: int, seed: int,
                           note: str = "") -> PhaseResult:
    """Phase 1 on features computed once: the frozen base runs once per image and view.

    Its epochs take a fraction of a second, so an interrupted phase 1 simply runs again
    (and finds its features in the cache). Its time is the head's training alone: the pass of
    the frozen base that made the features is reported on its own (``frozen_outputs``).
    With ``plan.heads`` > 1, that many heads train
    from different seeds and their weights are averaged: for linear heads on the same features
    that is exactly the average of their logits, an ensemble at the cost of one Dense layer.
    """
    start = time.perf_counter()
    per_epoch = max(steps(len(y_train), batch_size, plan.whole_batches), plan.head_steps)
    val = _rows(val_features, y_val, plan.val_batch_size or batch_size)
    kept, epochs = [], 0
    for k in range(plan.heads):
        if k:
            keras.utils.set_random_seed(seed + 7919 * k)  # another initialisation and dropout
        head = _head_like(model, train_views[0].shape[1])
        _compile(head, cast(float, plan.head_lr), plan, per_epoch * plan.head_epochs)
        head_best = Best()
        log = EpochLog("head", plan.history, first_epoch=epochs, sink=plan.history_log,
                       columns=plan.task.history_columns)
        hist = head.fit(
            _cycle(train_views, y_train, batch_size, seed + k, plan),
            steps_per_epoch=per_epoch, validation_data=val,
            epochs=plan.head_epochs, verbose=plan.verbose, shuffle=False,  # the cycle shuffles
            callbacks=[log, KeepBest(head_best, monitor=plan.task.monitor),
                       *_tensorboard(plan, "head")],
        )
        epochs += len(hist.epoch)
        kept.append(head.get_layer(HEAD_DENSE).get_weights())
    if len(kept) > 1:
        head.get_layer(HEAD_DENSE).set_weights([np.mean(w, axis=0) for w in zip(*kept)])
        scores = head.evaluate(val, verbose=0, return_dict=True)
        head_best = Best(float(scores[plan.task.monitor]), float(scores["loss"]))
    model.get_layer(HEAD_DENSE).set_weights(head.get_layer(HEAD_DENSE).get_weights())
    best.val_accuracy, best.val_loss = head_best.val_accuracy, head_best.val_loss
    best.weights = model.get_weights()
    note = note or "on features computed once by the frozen base"
    if len(kept) > 1:
        note += f"; {len(kept)} heads averaged (each its best epoch)"
    return PhaseResult("head", epochs, time.perf_counter() - start, best.val_accuracy, note)


def _top_trainer(model, top: keras.Model) -> keras.Model:
    """Cut activations -> top blocks -> the classifier's head, all layers shared with ``model``."""
    inputs = keras.Input(top.inputs[0].shape[1:], name="cut_activations")
    x = model.get_layer(HEAD_DROPOUT)(top(inputs))
    return keras.Model(inputs, model.get_layer(HEAD_DENSE)(x), name="top_trainer")


def find_head_lr(model, train_views: list, y_train, plan: PhasePlan, batch_size: int,
                 seed: int):
    """The range test for phase 1, on a throwaway head over the cached features."""
    from graftkit.train.lr_range import MIN_LR, range_test

    probe = _head_like(model, train_views[0].shape[1])
    _compile(probe, MIN_LR, plan)
    return range_test(probe, _cycle(train_views, y_train, batch_size, seed, plan))


def find_top_lr(model, base, block_pattern: str, top: keras.Model, train_views: list, y_train,
                plan: PhasePlan, batch_size: int, seed: int):
    """The range test for phase 2 on cached activations, from phase 1's weights (restored)."""
    from graftkit.train.lr_range import MIN_LR, range_test

    unfreeze(base, plan.unfreeze, keep_bn_frozen=True, block_pattern=block_pattern)
    try:
        probe = _top_trainer(model, top)
        _compile(probe, MIN_LR, plan)
        # from a trained head: the curve is flat until it climbs (lr_range's "climb" rule)
        return range_test(probe, _cycle(train_views, y_train, batch_size, seed, plan),
                          rule="climb")
    finally:
        freeze(base)


def fine_tune_on_activations(model, base, block_pattern: str, top: keras.Model,
                             train_views: list[np.ndarray | DiskRows], y_train, val_activations, y_val,
                             plan: PhasePlan, best: Best, batch_size: int,
                             seed: int) -> PhaseResult:
    """Phase 2 for the top blocks only, trained on cached activations at the cut.

    Below the cut everything is frozen and in inference mode, so its output is a pure function
    of the image view: computing it once gives the same gradients as running it every epoch.
    ``top`` shares its layers with ``model``, so training it trains the classifier in place.
    """
    counts = unfreeze(base, plan.unfreeze, keep_bn_frozen=True, block_pattern=block_pattern)
    trainer = _top_trainer(model, top)
    per_epoch = steps(len(y_train), batch_size, plan.whole_batches)
    _compile(trainer, cast(float, plan.fine_tune_lr), plan, per_epoch * plan.fine_tune_epochs,
             _factors(base, block_pattern, counts.unfrozen_blocks, plan, per_epoch))

    def data(initial_epoch: int):
        return _cycle(train_views, y_train, batch_size, seed, plan, initial_epoch)

    val = _rows(val_activations, y_val, plan.val_batch_size or batch_size)
    before = best.weights
    done = _fit_phase(trainer, "fine_tune", data, val,
                      plan.fine_tune_epochs, plan, best, plan.patience,
                      target=model, steps_per_epoch=per_epoch)
    freeze(base)
    return _fine_tune_result(plan, best, done, counts, before, " on cached activations")


def _factors(base, block_pattern: str, unfrozen: int | None, plan: PhasePlan, per_epoch: int):
    """Per-block rates (discriminative, gradual unfreezing) for the unfrozen top blocks."""
    from graftkit.backbones.registry import block_groups

    assert unfrozen is not None  # unfreeze() counts blocks whenever it is given a pattern
    return block_factors(block_groups(base, block_pattern), unfrozen, plan.training,
                         per_epoch)


def _fine_tune_result(plan: PhasePlan, best: Best, done: int, counts, before,
                      where: str = "") -> PhaseResult:
    n = counts.unfrozen_blocks
    note = (f"unfroze {n} block{'' if n == 1 else 's'} ({counts.trainable:,} trainable parameters)"
            f"{where}, BatchNormalization frozen")
    t = plan.training
    if t.lr_decay != 1.0:
        note += f"; each lower block at {t.lr_decay:g}x the rate of the one above"
    if t.unfreeze_epochs:
        note += "; blocks unfrozen one by one from epochs " + ",".join(
            str(e) for e in t.unfreeze_epochs[:n])
    return PhaseResult("fine_tune", done, _phase_seconds(plan, "fine_tune"),
                       best.val_accuracy, note, improved=best.weights is not before)


def fine_tune(model, base, block_pattern: str, train_ds, val_ds, plan: PhasePlan,
              best: Best) -> PhaseResult:
    """Phase 2: unfreeze, recompile at a low rate, keep the best weights of both phases."""
    counts = unfreeze(base, plan.unfreeze, keep_bn_frozen=True, block_pattern=block_pattern)
    per_epoch = _batches(train_ds)
    # trainable changed: only a compile makes it count
    _compile(model, cast(float, plan.fine_tune_lr), plan, per_epoch * plan.fine_tune_epochs,
             _factors(base, block_pattern, counts.unfrozen_blocks, plan, per_epoch))
    before = best.weights
    done = _fit_phase(model, "fine_tune", train_ds, val_ds, plan.fine_tune_epochs, plan,
                      best, plan.patience)
    freeze(base)  # the saved model comes back frozen, as it was after phase 1
    return _fine_tune_result(plan, best, done, counts, before)

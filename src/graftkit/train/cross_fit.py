"""Label issues: class probabilities for every labelled image from heads that did not train on it.

The labelled images (training and validation) are split into K folds, stratified by their given
label; for each fold a head with phase 1's settings trains on the frozen base's pooled features
of the other folds (the plain view of each image) and predicts this one. The K heads train
together in one model on cached features, so they cost seconds next to the run; the rule that
turns the probabilities into findings is ``graftkit.labels.issues``.

``graft fit`` runs it after the run on the features it cached; ``graft check --labels`` runs it
before any training, with the default backbone and head, so a folder can be cleaned first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from graftkit import defaults
from graftkit.labels.issues import LabelIssues, find_issues
from graftkit.train.optimizer import Training

if TYPE_CHECKING:
    from graftkit.data.folder import ImageFolder
    from graftkit.progress import ProgressFactory

PREDICT_ROWS = 1024  # features per call of a fold's head


@dataclass(frozen=True)
class HeadSettings:
    """Phase 1's head and how it trains (a run's own, or the defaults before any run)."""

    epochs: int | str = "auto"  # "auto": train.phases.head_schedule for its rows
    lr: float = defaults.HEAD_LR
    dropout: float = defaults.DROPOUT_CACHED
    batch_size: int = defaults.BATCH_SIZE
    training: Training = field(default_factory=Training)
    class_weight: dict[int, float] | None = None


def stratified_folds(labels, folds: int, seed: int) -> np.ndarray:
    """Each image's fold: every class spread evenly over the folds, in a seeded order."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0  # classes continue where the last one stopped, so small classes fill folds evenly
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        fold[rows] = (start + np.arange(len(rows))) % folds
        start = (start + len(rows)) % folds
    return fold


def fit_head(features: np.ndarray, labels, num_classes: int, settings: HeadSettings,
             seed: int = defaults.SEED):
    """A head with phase 1's settings trained on pooled features (no validation: a fixed
    number of epochs); the Keras model, softmax out."""
    import keras

    from graftkit.graft import build_head
    from graftkit.train.phases import PhasePlan, _compile, head_schedule, view_cycle

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    epochs, per_epoch = head_schedule(settings.epochs, len(labels), settings.batch_size)
    plan = PhasePlan(epochs, 0, settings.lr, settings.lr, 0,
                     class_weight=settings.class_weight, training=settings.training)
    keras.utils.set_random_seed(seed)
    head = build_head(features.shape[1], num_classes, settings.dropout)
    _compile(head, settings.lr, plan, per_epoch * epochs)
    head.fit(view_cycle([features], labels, settings.batch_size, seed, settings.class_weight),
             steps_per_epoch=per_epoch, epochs=epochs, verbose=0, shuffle=False)
    return head


def head_probabilities(head, features: np.ndarray) -> np.ndarray:
    import keras

    features = np.asarray(features, dtype=np.float32)
    out = [keras.ops.convert_to_numpy(head(features[i: i + PREDICT_ROWS], training=False))
           for i in range(0, len(features), PREDICT_ROWS)]
    return np.concatenate(out) if out else np.zeros((0, head.outputs[0].shape[-1]), np.float32)


def _held_out_loss(num_classes: int, folds: int, smoothing: float):
    """Cross-entropy (with phase 1's label smoothing) of each head on the images outside its
    fold: ``y_true`` holds each image's label and fold; the mean over the heads it trains."""
    from keras import ops

    def loss(y_true, y_pred):
        label = ops.cast(y_true[:, 0], "int32")
        own = ops.cast(y_true[:, 1], "int32")
        target = ops.one_hot(label, num_classes) * (1 - smoothing) + smoothing / num_classes
        ce = -ops.sum(target[:, None, :] * ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
        trains = 1.0 - ops.one_hot(own, folds)  # head k never sees fold k
        return ops.sum(ce * trains, axis=1) / ops.sum(trains, axis=1)

    return loss


def out_of_fold(features: np.ndarray, labels, num_classes: int, settings: HeadSettings,
                folds: int = defaults.LABEL_FOLDS, seed: int = defaults.SEED) -> np.ndarray:
    """Class probabilities of every row from a head trained on the other folds.

    The K heads train side by side in one model (one Dense layer of K x classes units, each
    head's loss masked to the images outside its fold), so one pass over the data trains all
    of them: 4-5x faster than K fits, with the same findings (benchmarks/label_noise.py).
    """
    import keras
    import tensorflow as tf
    from keras import layers

    from graftkit.train.optimizer import optimizer
    from graftkit.train.phases import head_schedule

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    fold = stratified_folds(labels, folds, seed)
    keras.utils.set_random_seed(seed)
    x = keras.Input((features.shape[1],), name="features")
    h = layers.Dropout(settings.dropout)(x)
    h = layers.Dense(folds * num_classes, dtype="float32", name="heads")(h)
    out = layers.Softmax(axis=-1)(layers.Reshape((folds, num_classes))(h))
    model = keras.Model(x, out, name="fold_heads")
    epochs, per_epoch = head_schedule(settings.epochs, n, settings.batch_size)
    model.compile(optimizer=optimizer(settings.lr, per_epoch * epochs, settings.training,
                                      model.trainable_variables),
                  loss=_held_out_loss(num_classes, folds, settings.training.label_smoothing))
    targets = np.stack([labels, fold], axis=1).astype(np.float32)
    weights = (np.ones(n, np.float32) if settings.class_weight is None else
               np.array([settings.class_weight[int(y)] for y in labels], np.float32))
    data = tf.data.Dataset.from_tensor_slices((features, targets, weights))
    data = data.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    model.fit(data.batch(settings.batch_size).repeat(), steps_per_epoch=per_epoch,
              epochs=epochs, verbose=0, shuffle=False)  # the dataset shuffles
    probs = np.concatenate([keras.ops.convert_to_numpy(model(features[i: i + PREDICT_ROWS],
                                                            training=False))
                            for i in range(0, n, PREDICT_ROWS)]) if n else \
        np.zeros((0, folds, num_classes), np.float32)
    return probs[np.arange(n), fold]


def label_issues(features: np.ndarray, labels, paths: list[str], splits: list[str],
                 classes: list[str], settings: HeadSettings,
                 folds: int = defaults.LABEL_FOLDS, seed: int = defaults.SEED) -> LabelIssues:
    """The confident-learning findings over labelled images, from their pooled features."""
    start = time.perf_counter()
    probs = out_of_fold(features, labels, len(classes), settings, folds, seed)
    issues = find_issues(probs, labels, paths, splits, classes)
    return LabelIssues(issues, len(labels), folds, time.perf_counter() - start)


def pooled_features(folder: ImageFolder, base: str = defaults.DEFAULT_BACKBONE,
                    image_size: int | None = None, cache: bool = True,
                    log: Callable[[str], None] = print,
                    bars: ProgressFactory | None = None) -> np.ndarray:
    """The pretrained ``base``'s pooled features of every plain training, then validation
    image, at ``image_size`` (None: the size ``graft fit`` would choose); cached, under the
    engine a default fit would choose for the whole job, so that fit reads these rows."""
    from graftkit.backbones import REGISTRY, load_base
    from graftkit.frozen.cut import part_key, split_base
    from graftkit.frozen.engine import FrozenPart
    from graftkit.frozen.extract import extract
    from graftkit.frozen.precision import engine_settings
    from graftkit.train.stages import auto_image_size

    if image_size is None and base in REGISTRY:
        image_size = auto_image_size(folder, REGISTRY[base].input_size)[0]
    base_model, info = load_base(base, image_size)
    split = split_base(base_model, info.block_pattern, 0)
    assert split is not None  # a cut below no block is always possible
    frozen_model = split.frozen_model()
    precision, _, calibration = engine_settings(folder, info.image_size)
    part = FrozenPart(frozen_model, part_key(frozen_model, info.image_size,
                                             f"{split.cut}:{defaults.PRECISION}"),
                      fixed_batch=True, precision=precision, calibration=calibration)
    part.notify = log
    part.plan(len(folder.train) * defaults.VIEWS + len(folder.val), reuse_engine=False)
    store_key = part.store_key if cache else None
    start = time.perf_counter()
    rows = []
    for s in (folder.train, folder.val):
        ex = extract(part, s.paths, folder.digests(s), info.image_size, 1, None, store_key,
                     bars=bars)
        rows.append(np.asarray(ex.views[0][0][np.arange(len(s))], dtype=np.float32))
    log(f"features: {info.name} at {info.image_size} px, {len(folder.train) + len(folder.val)} "
        f"images ({part.label}, {time.perf_counter() - start:.1f} s)")
    return np.concatenate(rows)


def check_labels(folder: ImageFolder, base: str = defaults.DEFAULT_BACKBONE,
                 folds: int = defaults.LABEL_FOLDS, seed: int = defaults.SEED,
                 cache: bool = True, log: Callable[[str], None] = print,
                 bars: ProgressFactory | None = None) -> LabelIssues:
    """``graft check --labels``: label issues of a scanned folder before any training, with
    the default head on ``base``'s features at the size ``graft fit`` would choose."""
    features = pooled_features(folder, base, None, cache, log, bars)
    return label_issues(features, [*folder.train.labels, *folder.val.labels],
                        [*folder.train.paths, *folder.val.paths],
                        ["train"] * len(folder.train) + ["val"] * len(folder.val),
                        folder.classes, HeadSettings(), folds, seed)

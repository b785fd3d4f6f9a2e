"""What a phase trains with: AdamW, its learning-rate schedule, per-block rates and the loss.

Keras has all of it but two pieces, written here as small subclasses of Keras' own classes:
sparse labels with label smoothing (``SparseCategoricalCrossentropy`` has no ``label_smoothing``)
and per-block learning rates (discriminative rates and gradual unfreezing; Keras 3 optimizers
take one rate for every variable).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops

from graftkit import defaults
from graftkit.defaults import SCHEDULES

COSINE_WARMUP = 0.05  # of a phase's steps: a short linear warm-up before the cosine decay
ONE_CYCLE_WARMUP = 0.25  # fastai's fit_one_cycle: a quarter up from lr/25, then cosine down
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL = 1e-4  # the last step's rate, as a fraction of the peak


@dataclass(frozen=True)
class Training:
    """How every phase trains: schedule shape, weight decay, label smoothing, per-block rates."""

    schedule: str = defaults.LR_SCHEDULE
    weight_decay: float = defaults.WEIGHT_DECAY
    label_smoothing: float = 0.0  # fit resolves defaults.LABEL_SMOOTHING ("auto") to a number
    lr_decay: float = defaults.LR_DECAY  # each block below the top one: this times the rate above
    unfreeze_epochs: tuple[int, ...] = ()  # block k from the top starts at epoch [k] (gradual)


def learning_rate(lr: float, total_steps: int, kind: str):
    """A Keras learning-rate schedule for ``total_steps`` steps peaking at ``lr``."""
    if kind == "constant" or total_steps < 4:
        return lr
    if kind == "cosine":
        warm = max(1, round(total_steps * COSINE_WARMUP))
        return keras.optimizers.schedules.CosineDecay(
            lr / 10, total_steps - warm, alpha=0.0, warmup_target=lr, warmup_steps=warm)
    if kind == "one-cycle":
        warm = max(1, round(total_steps * ONE_CYCLE_WARMUP))
        return keras.optimizers.schedules.CosineDecay(
            lr / ONE_CYCLE_DIV, total_steps - warm, alpha=ONE_CYCLE_FINAL, warmup_target=lr,
            warmup_steps=warm)
    raise ValueError(f"unknown schedule {kind!r}: one of {', '.join(SCHEDULES)}")


@keras.saving.register_keras_serializable(package="graftkit")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels with label smoothing (one-hot, then Keras' own loss)."""

    def __init__(self, label_smoothing: float = 0.1, name: str = "sparse_smoothed_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def loss(label_smoothing: float):
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return SparseSmoothedCrossentropy(label_smoothing)


class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW with a rate factor and a first step per variable.

    ``factors`` maps ``id(variable)`` to ``(factor, first_step)``: the variable trains at
    ``factor`` times the schedule's rate from ``first_step`` on, and not at all before (its
    moments still accumulate, so it starts warm). Weight decay follows the same rate, so a
    variable that has not started is left exactly as it is. Variables not named train at 1x.
    """

    def __init__(self, factors: dict[int, tuple[float, int]], **kwargs):
        super().__init__(**kwargs)
        self._by_id = dict(factors)
        self._factors: list[tuple[float, int]] = []
        self._decayed: list[bool] = []

    def build(self, var_list):
        super().build(var_list)
        self._factors = [self._by_id.get(id(v), (1.0, 0)) for v in var_list]
        self._decayed = [self._use_weight_decay(v) for v in var_list]

    def _apply_weight_decay(self, variables):
        pass  # applied in update_step, at each variable's own rate

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        factor, first = self._factors[i]
        lr = ops.cast(learning_rate, variable.dtype) * factor
        if first > 0:
            lr = lr * ops.cast(ops.greater_equal(self.iterations, first), variable.dtype)
        if self.weight_decay and self._decayed[i]:
            self.assign_sub(variable, variable * ops.cast(self.weight_decay, variable.dtype) * lr)
        super().update_step(gradient, variable, lr)


def optimizer(lr, total_steps: int, training: Training, variables: list,
              factors: dict[int, tuple[float, int]] | None = None) -> keras.optimizers.Optimizer:
    """Adam (no weight decay) or AdamW for one phase; ``LayerwiseAdamW`` when blocks differ.

    ``variables`` are the ones it will train: biases, BatchNormalization scales and other 1-D
    variables are kept out of weight decay, as usual.
    """
    rate = learning_rate(lr, total_steps, training.schedule)
    if factors and any(f != (1.0, 0) for f in factors.values()):
        opt = LayerwiseAdamW(factors, learning_rate=rate, weight_decay=training.weight_decay)
    elif training.weight_decay:
        opt = keras.optimizers.AdamW(rate, weight_decay=training.weight_decay)
    else:
        return keras.optimizers.Adam(rate)
    opt.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) < 2])
    return opt


def block_factors(groups: list[list], top_n: int, training: Training,
                  steps_per_epoch: int) -> dict[int, tuple[float, int]]:
    """``(factor, first step)`` for the variables of the top ``top_n`` blocks of ``groups``.

    Block ``k`` from the top (0: the top block) trains at ``lr_decay ** k`` times the rate,
    from epoch ``unfreeze_epochs[k]`` on (the last entry for the blocks past the list).
    """
    out: dict[int, tuple[float, int]] = {}
    epochs = training.unfreeze_epochs
    for k, group in enumerate(reversed(groups[len(groups) - top_n:])):
        first = (epochs[min(k, len(epochs) - 1)] if epochs else 0) * steps_per_epoch
        for layer in group:
            for v in layer.trainable_weights:
                out[id(v)] = (training.lr_decay ** k, first)
    return out

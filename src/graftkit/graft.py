"""Base + new head, and the freeze/unfreeze rules of the Keras transfer-learning guide.

Two traps of the guide are closed here:
- ``trainable`` only takes effect after ``compile()``. ``freeze``/``unfreeze`` recompile a
  compiled model themselves (same loss, metrics and optimizer settings), so a stale
  compiled state cannot survive a change.
- On the TensorFlow backend, ``model.trainable = True`` does nothing when the model's own flag
  is already True (Keras' trackable ``__setattr__`` skips an assignment of the same object), so
  sublayers frozen one by one would stay frozen. ``set_trainable`` sets every layer explicitly.
- In Keras 3, ``fit()`` runs BatchNormalization in training mode whatever ``training=False``
  said at construction, unless the layer's ``trainable`` is False. ``unfreeze`` keeps every BN
  layer frozen by default, so its statistics (and so its behaviour) never change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from graftkit import defaults
from graftkit.backbones.registry import block_groups, count_params, layers_within

HEAD_DROPOUT = "head_dropout"
HEAD_DENSE = "head_dense"
BASE = "base"


@dataclass(frozen=True)
class TrainableCounts:
    """Parameter counts after a freeze or unfreeze."""

    trainable: int
    non_trainable: int
    unfrozen_blocks: int | None = None


def counts(model: keras.Model, unfrozen_blocks: int | None = None) -> TrainableCounts:
    return TrainableCounts(
        count_params(model.trainable_weights),
        count_params(model.non_trainable_weights),
        unfrozen_blocks,
    )


def build_classifier(base: keras.Model, num_classes: int,
                     dropout: float = defaults.DROPOUT_WHOLE_BASE,
                     activation: str = "softmax") -> keras.Model:
    """Raw pixels -> base (inference mode) -> dropout -> softmax (or one sigmoid per label,
    for label sets), as one functional model."""
    inputs = keras.Input(base.inputs[0].shape[1:], name="image")
    x = base(inputs, training=False)
    x = layers.Dropout(dropout, name=HEAD_DROPOUT)(x)
    # The head computes in float32 whatever the policy: softmax and loss need the range.
    outputs = layers.Dense(num_classes, activation=activation, name=HEAD_DENSE,
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="graft")


def is_multi_label(model: keras.Model) -> bool:
    """A head of sigmoids: each output is its own yes/no, not a share of one answer."""
    return model.get_layer(HEAD_DENSE).activation.__name__ == "sigmoid"


def with_features(model: keras.Model) -> keras.Model:
    """The classifier with two outputs, ``[penultimate features, probabilities]``: one pass
    gives the answer and what the open-set score measures."""
    dense = model.get_layer(HEAD_DENSE)
    return keras.Model(model.inputs, [dense.input, model.outputs[0]], name=f"{model.name}_features")


def head_logits(model: keras.Model, features):
    """The head's logits (float64) from penultimate features: what calibration fits and the
    energy score reads, without clipping probabilities back through a log."""
    import numpy as np

    kernel, bias = model.get_layer(HEAD_DENSE).get_weights()
    return np.asarray(features, dtype=np.float64) @ kernel + bias


def build_head(feature_dim: int, num_classes: int,
               dropout: float = defaults.DROPOUT_WHOLE_BASE,
               activation: str = "softmax") -> keras.Model:
    """The same head on its own, for training on features computed once by the frozen base."""
    inputs = keras.Input((feature_dim,), name="features")
    x = layers.Dropout(dropout, name=HEAD_DROPOUT)(inputs)
    outputs = layers.Dense(num_classes, activation=activation, name=HEAD_DENSE,
                           dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def _recompile(model: keras.Model, learning_rate: float | None = None) -> None:
    """Recompile with the same settings, since a trainable change is invisible until then."""
    if not getattr(model, "compiled", False):
        return
    config = model.get_compile_config()
    if learning_rate is not None:
        config["optimizer"]["config"]["learning_rate"] = learning_rate
    model.compile_from_config(config)


def set_trainable(model: keras.layers.Layer, value: bool) -> None:
    """``model.trainable = value`` for ``model`` and every layer inside it, whatever their state."""
    for layer in layers_within(model):
        layer.trainable = not value  # a real change, so the setter runs on every backend
        layer.trainable = value


def freeze(model: keras.layers.Layer, recompile_model: keras.Model | None = None) -> TrainableCounts:
    """Freeze ``model`` and every layer inside it; returns the counts of ``recompile_model``."""
    set_trainable(model, False)
    owner = recompile_model or model
    if isinstance(owner, keras.Model):
        _recompile(owner)
    return counts(owner)


def unfreeze(
    model: keras.layers.Layer,
    top_n: int | str | None = "all",
    keep_bn_frozen: bool = True,
    block_pattern: str = r"^(block\d+)_",
    recompile_model: keras.Model | None = None,
    learning_rate: float | None = None,
) -> TrainableCounts:
    """Unfreeze all of ``model`` or its top ``top_n`` blocks, BatchNorm kept frozen.

    Args:
        model: the base (or any model) to unfreeze.
        top_n: ``"all"``/None, or how many blocks to unfreeze counting from the output end.
        keep_bn_frozen: keep BatchNormalization layers frozen, hence in inference mode.
        block_pattern: regex whose first group names a layer's block.
        recompile_model: the compiled model that contains ``model`` (recompiled here).
        learning_rate: learning rate for that recompilation.
    """
    set_trainable(model, True)
    groups = block_groups(model, block_pattern)
    n_blocks = len(groups)
    if top_n not in (None, "all"):
        n = int(top_n)
        if n < 0:
            raise ValueError(f"top_n must be >= 0 (got {n})")
        frozen = groups[: max(n_blocks - n, 0)]
        for group in frozen:
            for layer in group:
                layer.trainable = False
        n_blocks = min(n, n_blocks)
    if keep_bn_frozen:
        for layer in layers_within(model, leaves_only=True):
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    owner = recompile_model or model
    if isinstance(owner, keras.Model):
        _recompile(owner, learning_rate)
    return counts(owner, n_blocks)


def weight_table(model: keras.Model, flatten: bool = False) -> list[dict]:
    """The guide's introspection: per-layer counts of weights, trainable and non-trainable."""
    rows = []
    chosen = [layer for layer in layers_within(model, leaves_only=True)] if flatten else model.layers
    for layer in chosen:
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__,
            "weights": len(layer.weights),
            "trainable_weights": len(layer.trainable_weights),
            "non_trainable_weights": len(layer.non_trainable_weights),
            "params": count_params(layer.weights),
            "trainable_params": count_params(layer.trainable_weights),
        })
    return rows


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight and its shape: names a frozen part, proves workers in sync."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()

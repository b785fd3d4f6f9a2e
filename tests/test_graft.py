"""The Keras guide's facts about trainable weights, and graftkit's freeze/unfreeze rules."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from graftkit.backbones import load_base
from graftkit.graft import build_classifier, freeze, unfreeze
from graftkit.train.phases import Best, KeepBest


def test_dense_weights():
    layer = layers.Dense(3)
    layer.build((None, 4))
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 2, 0)
    layer.trainable = False
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 0, 2)


def test_batchnorm_weights():
    layer = layers.BatchNormalization()
    layer.build((None, 4))
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (4, 2, 2)


def test_set_trainable_reaches_layers_frozen_one_by_one():
    """On the TF backend `model.trainable = True` is skipped when already True; ours is not."""
    from graftkit.graft import set_trainable

    inputs = keras.Input((3,))
    dense = layers.Dense(3)
    model = keras.Model(inputs, dense(inputs))
    dense.trainable = False
    set_trainable(model, True)
    assert dense.trainable and len(model.trainable_weights) == 2


def test_trainable_false_on_a_model_propagates_to_every_sublayer():
    inner = keras.Sequential([keras.Input((3,)), layers.Dense(3, activation="relu")])
    model = keras.Sequential([keras.Input((3,)), inner, layers.Dense(3)])
    model.trainable = False
    assert all(not layer.trainable for layer in inner.layers) and not model.layers[-1].trainable
    assert len(model.trainable_weights) == 0


def test_frozen_layer_weights_do_not_change_during_fit():
    """The guide's check, with assert_allclose before and after fit."""
    layer1 = layers.Dense(3, activation="relu")
    layer2 = layers.Dense(3, activation="sigmoid")
    model = keras.Sequential([keras.Input(shape=(3,)), layer1, layer2])
    layer1.trainable = False
    before = layer1.get_weights()
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.random((2, 3)), np.random.random((2, 3)), verbose=0)
    for a, b in zip(before, layer1.get_weights()):
        np.testing.assert_allclose(a, b)


@pytest.fixture(scope="module")
def graft():
    base, info = load_base("efficientnet_lite0", 32)
    model = build_classifier(base, 3)
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = np.arange(16) % 3
    return base, info, model, x, y


def _bn_stats(base):
    return [v.numpy().copy() for v in base.non_trainable_weights
            if "moving_mean" in v.path or "moving_variance" in v.path]


def test_phase1_leaves_the_whole_base_unchanged(graft):
    base, _info, model, x, y = graft
    counts = freeze(base, model)
    assert counts.trainable == 1280 * 3 + 3  # the head's Dense only
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in base.get_weights()]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for a, b in zip(before, base.get_weights()):
        np.testing.assert_allclose(a, b)


def test_unfreeze_keeps_batchnorm_frozen_and_its_statistics_unchanged(graft):
    """The trap of keras-team/keras#20285: fit() runs BN in training mode if it is trainable."""
    base, info, model, x, y = graft
    unfreeze(base, "all", block_pattern=info.block_pattern)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    stats = _bn_stats(base)
    conv_before = base.get_layer("efficientnet_lite0").get_layer("stem_conv").get_weights()[0].copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(stats, _bn_stats(base)):
        np.testing.assert_allclose(a, b)
    conv_after = base.get_layer("efficientnet_lite0").get_layer("stem_conv").get_weights()[0]
    assert not np.allclose(conv_before, conv_after), "unfrozen conv weights should train"


def test_without_the_bn_rule_statistics_do_drift(graft):
    """The control: the same fit with BN trainable changes the statistics (so the test above can fail)."""
    base, info, model, x, y = graft
    unfreeze(base, "all", keep_bn_frozen=False, block_pattern=info.block_pattern)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    stats = _bn_stats(base)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(stats, _bn_stats(base)))
    freeze(base)


def test_unfreeze_top_blocks_counts(graft):
    base, info, model, _x, _y = graft
    c1 = unfreeze(base, 1, block_pattern=info.block_pattern)
    top = base.get_layer("efficientnet_lite0").get_layer("top_conv")
    assert c1.unfrozen_blocks == 1 and c1.trainable == int(np.prod(top.kernel.shape))
    assert not base.get_layer("efficientnet_lite0").get_layer("block15_dwconv").trainable
    c3 = unfreeze(base, 3, block_pattern=info.block_pattern)
    assert c3.trainable > c1.trainable
    trainable_names = {layer.name for layer in base.get_layer("efficientnet_lite0").layers
                       if layer.trainable_weights}
    assert trainable_names == {"top_conv", "block15_expand_conv", "block15_dwconv",
                               "block15_project_conv", "block14_expand_conv", "block14_dwconv",
                               "block14_project_conv"}
    freeze(base)


def test_trainable_changes_recompile_a_compiled_model():
    """Through the API a trainable change always reaches the optimizer: no stale compile."""
    base, info = load_base("efficientnet_lite0", 32)
    model = build_classifier(base, 2)
    freeze(base)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 2
    model.fit(x, y, epochs=1, verbose=0)  # traces the train step with the head only
    counts = unfreeze(base, 1, block_pattern=info.block_pattern, recompile_model=model)
    assert len(model.trainable_weights) == 3  # head kernel + bias, top_conv kernel
    assert counts.trainable == count_trainable(model)
    kernel = base.get_layer("efficientnet_lite0").get_layer("top_conv").kernel
    before = kernel.numpy().copy()
    model.fit(x, y, epochs=1, verbose=0)  # no compile() by the caller
    assert not np.allclose(before, kernel.numpy())
    freeze(base, recompile_model=model)
    frozen_before = kernel.numpy().copy()
    model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(frozen_before, kernel.numpy())


def count_trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def test_keep_best_restores_the_previous_phase_when_nothing_improves():
    model = keras.Sequential([keras.Input((2,)), layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(10.0), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    x = np.array([[1, 0], [0, 1]] * 8, dtype="float32")
    y = np.array([0, 1] * 8)
    model.layers[0].set_weights([np.array([[5, -5], [-5, 5]], "float32"), np.zeros(2, "float32")])
    good = model.get_weights()
    best = Best(val_accuracy=1.0, val_loss=0.0, weights=good)  # a perfect earlier phase
    model.fit(x, 1 - y, validation_data=(x, y), epochs=3, verbose=0,
              callbacks=[KeepBest(best, patience=5)])  # trains towards the wrong labels
    for a, b in zip(good, model.get_weights()):
        np.testing.assert_allclose(a, b)

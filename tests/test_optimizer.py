"""What each phase trains with: schedules, label smoothing, per-block rates, and --mode."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from graftkit.cli import main
from graftkit.options import parse_unfreeze_schedule
from graftkit.train.optimizer import (
    LayerwiseAdamW,
    SparseSmoothedCrossentropy,
    Training,
    block_factors,
    learning_rate,
    optimizer,
)

from .conftest import make_folder


def test_cosine_warms_up_then_decays_to_zero_and_one_cycle_starts_low():
    cosine = learning_rate(1e-3, 100, "cosine")
    rates = [float(cosine(s)) for s in (0, 5, 50, 100)]
    assert rates[0] == pytest.approx(1e-4)  # lr/10 on the first step
    assert rates[1] == pytest.approx(1e-3)  # the peak after 5% of the steps
    assert 1e-4 < rates[2] < 1e-3
    assert rates[3] == pytest.approx(0.0, abs=1e-9)
    one = learning_rate(1e-3, 100, "one-cycle")
    assert float(one(0)) == pytest.approx(1e-3 / 25)
    assert float(one(25)) == pytest.approx(1e-3)
    assert float(one(100)) == pytest.approx(1e-7, rel=1e-3)
    assert learning_rate(1e-3, 100, "constant") == 1e-3
    with pytest.raises(ValueError):
        learning_rate(1e-3, 100, "triangle")


def test_smoothed_loss_is_keras_categorical_crossentropy_on_one_hot_labels():
    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], dtype="float32")
    one_hot = keras.ops.one_hot(y, 3)
    for smoothing in (0.0, 0.1, 0.3):
        ours = float(SparseSmoothedCrossentropy(smoothing)(y, p))
        ref = float(keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)(one_hot, p))
        assert ours == pytest.approx(ref, rel=1e-6)
    plain = float(keras.losses.SparseCategoricalCrossentropy()(y, p))
    assert float(SparseSmoothedCrossentropy(0.0)(y, p)) == pytest.approx(plain, rel=1e-6)
    assert float(SparseSmoothedCrossentropy(0.1)(y, p)) != pytest.approx(plain, rel=1e-3)


def _two_layers():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    low = keras.layers.Dense(8, activation="relu", name="low")
    high = keras.layers.Dense(3, activation="softmax", name="high")
    return keras.Model(inputs, high(low(inputs))), low, high


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_block_before_its_start_step_does_not_change_and_a_lower_factor_moves_less(
        weight_decay):
    x, y = _data()
    # "low" starts after the 4 steps of this fit: it must stay exactly as it is (weight decay
    # included), the way the guide checks frozen weights.
    model, low, high = _two_layers()
    factors = {id(v): (1.0, 10) for v in low.trainable_weights}
    model.compile(LayerwiseAdamW(factors, learning_rate=1e-2, weight_decay=weight_decay),
                  "sparse_categorical_crossentropy")
    before_low, before_high = [w.copy() for w in low.get_weights()], high.get_weights()[0].copy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(before_low, low.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
    assert not np.allclose(before_high, high.get_weights()[0])
    # From its start step on it trains; at factor 0.1 it moves about a tenth as far.
    moved = {}
    for factor in (1.0, 0.1):
        model, low, _ = _two_layers()
        start = low.get_weights()[0].copy()
        model.compile(LayerwiseAdamW({id(v): (factor, 2) for v in low.trainable_weights},
                                     learning_rate=1e-2, weight_decay=weight_decay),
                      "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        moved[factor] = np.abs(low.get_weights()[0] - start).mean()
    assert moved[1.0] > 0 and 0.05 < moved[0.1] / moved[1.0] < 0.2, moved


def test_block_factors_discriminative_and_gradual():
    model, low, high = _two_layers()
    groups = [[low], [high]]
    t = Training(lr_decay=0.5, unfreeze_epochs=parse_unfreeze_schedule("gradual"))
    f = block_factors(groups, 2, t, steps_per_epoch=7)
    assert f[id(high.kernel)] == (1.0, 0)  # the top block: full rate from the start
    assert f[id(low.kernel)] == (0.5, 7)  # one down: half the rate, from the second epoch
    assert block_factors(groups, 1, t, 7).keys() == {id(v) for v in high.trainable_weights}
    assert parse_unfreeze_schedule("0,2") == (0, 2)
    assert parse_unfreeze_schedule("none") == ()
    for bad in ("2,1", "x", "-1"):
        with pytest.raises(ValueError):
            parse_unfreeze_schedule(bad)
    # One rate everywhere: Keras' own optimizers, biases kept out of weight decay.
    plain = optimizer(1e-3, 10, Training(weight_decay=0.01), model.trainable_variables,
                      block_factors(groups, 2, Training(), 7))
    assert type(plain) is keras.optimizers.AdamW
    assert type(optimizer(1e-3, 10, Training(weight_decay=0.0), [])) is keras.optimizers.Adam


def test_training_defaults_are_those_of_defaults_py():
    """A PhasePlan built without training= trains as graft fit does, not with other values."""
    from graftkit import defaults

    t = Training()
    assert (t.schedule, t.weight_decay, t.lr_decay) == (
        defaults.LR_SCHEDULE, defaults.WEIGHT_DECAY, defaults.LR_DECAY)
    assert type(optimizer(1e-3, 10, t, [])) is keras.optimizers.AdamW


def _fit(tmp_path, name, *extra):
    data = tmp_path / "data"
    if not data.exists():
        make_folder(data, per_class=12, size=40)
    out = tmp_path / name
    args = ["fit", str(data), "--out", str(out), "--image-size", "32", "--batch-size", "8",
            "--head-epochs", "3", "--fine-tune-epochs", "2", "--unfreeze", "2", *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.integration
def test_mode_head_skips_fine_tuning_and_says_why(tmp_path, capsys, monkeypatch):
    import graftkit
    from graftkit.frozen.engine import ENGINE_ENV

    monkeypatch.setenv(ENGINE_ENV, "tflite")  # converted, as a large set's would be
    # float32, compared with Keras below (auto is int8 on a CPU with 8-bit dot products)
    m = _fit(tmp_path, "head", "--mode", "head", "--engine-precision", "f32")
    assert [p["name"] for p in m["phases"]] == ["head"]
    assert m["mode"]["chosen"] == "head" and m["mode"]["reason"] == "--mode head"
    assert "chose head: --mode head" in capsys.readouterr().out
    assert m["options"]["label_smoothing"] == 0.0  # auto: no whole-base fine-tuning here
    assert m["options"]["dropout"] == 0.7
    # Predicting cuts the model where the fit did (above the base), so the fit's engine fits.
    run = graftkit.load(tmp_path / "head")
    images = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))[:4]
    fast = run.predict_proba(images)
    monkeypatch.setenv(ENGINE_ENV, "keras")
    np.testing.assert_allclose(fast, graftkit.load(tmp_path / "head").predict_proba(images),
                               atol=1e-4)
    # An engine that fails while predicting hands over to Keras and says why on stderr.
    from graftkit.frozen import runtimes

    def boom(self, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(runtimes.TFLiteRunner, "__call__", boom)
    monkeypatch.setenv(ENGINE_ENV, "tflite")
    capsys.readouterr()
    np.testing.assert_allclose(graftkit.load(tmp_path / "head").predict_proba(images), fast,
                               atol=1e-4)
    assert "tflite failed (RuntimeError: boom): using keras" in capsys.readouterr().err


def test_label_smoothing_auto_smooths_runs_that_fine_tune_the_whole_base(trained_run):
    m = json.loads((trained_run / "run" / "metrics.json").read_text())
    assert m["options"]["unfreeze"] == "all" and m["options"]["label_smoothing"] == 0.1
    assert m["options"]["dropout"] == 0.2  # auto: the guide's rate where the whole base trains


@pytest.mark.slow
def test_mode_auto_and_fine_tune_report_their_choice(tmp_path):
    auto = _fit(tmp_path, "auto", "--lr-decay", "0.5", "--unfreeze-schedule", "gradual",
                "--schedule", "one-cycle")
    assert auto["mode"]["requested"] == "auto"
    assert len(auto["phases"]) == 2
    # The saved model is the one the run names: its validation accuracy is that phase's best.
    kept = {"head": 0, "fine_tune": 1}[auto["mode"]["chosen"]]
    assert auto["val_accuracy"] == pytest.approx(auto["phases"][kept]["best_val_accuracy"])
    assert ("validation" in auto["mode"]["reason"]) and auto["mode"]["fine_tune_seconds"] > 0
    assert "rate of the one above" in auto["phases"][1]["note"]


def test_auto_image_size_and_depth_follow_the_data(tmp_path):
    from graftkit.data.folder import scan
    from graftkit.train.stages import auto_image_size, auto_unfreeze

    sizes = {}
    for side in (8, 40, 300):
        folder = scan(make_folder(tmp_path / str(side), per_class=4, size=side), 0.25, 0)
        sizes[side] = auto_image_size(folder, 224)
    assert sizes[8][0] == 64 and "median side is 8 px" in sizes[8][1]  # 4x would be 32: floor 64
    assert sizes[40][0] == 160  # 4 x 40, a multiple of 32
    assert sizes[300][0] == 288 and "pretraining size" in sizes[300][1]  # 1.3 x 224, by 32
    assert auto_unfreeze(150, 224)[0] == "all"  # the whole base is cheap
    assert auto_unfreeze(244, 224)[0] == 2  # hymenoptera: top 2 blocks on cached activations
    assert auto_unfreeze(1437, 64)[0] == "all"  # digits at 64 px: 117 224-px images' worth
    assert auto_unfreeze(1600, 224)[0] == 2  # flowers5: top blocks on cached activations


@pytest.mark.integration
def test_heads_are_averaged_into_one_and_every_epoch_is_logged(tmp_path):
    import csv

    m = _fit(tmp_path, "heads", "--mode", "head", "--heads", "3")
    head = m["phases"][0]
    assert head["epochs"] == 9 and "3 heads averaged" in head["note"]
    rows = list(csv.DictReader((tmp_path / "heads" / "history.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 10))
    # The saved model scores what phase 1 reported for the averaged head.
    assert abs(m["val_accuracy"] - head["best_val_accuracy"]) < 1e-6


@pytest.mark.parametrize("views, said", [(1, True), (2, False)])
def test_one_view_says_the_augmentation_is_never_applied(tmp_path, views, said):
    """cut_base says so where it decides the views, with no fit around it."""
    from graftkit.backbones import load_base
    from graftkit.graft import build_classifier
    from graftkit.train import stages
    from graftkit.train.distribute import Distribution
    from graftkit.train.phases import Best, PhasePlan
    from graftkit.train.records import ModelPlan, RunContext, Training
    from graftkit.train.workflow import make_options

    options = stages.resolve_auto(make_options(views=views, mode="head", image_size=32), 10,
                                  32).options
    base, info = load_base("efficientnet_lite0", 32, None)
    built = ModelPlan(options, base, build_classifier(base, 2, 0.7), info)
    lines: list[str] = []
    run = RunContext(tmp_path, Distribution("default", None), lines.append, 0)
    cut = stages.cut_base(run, built, Training(8, PhasePlan(2, 0, 1e-3, 1e-4, 1), Best()))
    assert cut.views == views
    assert any("--views 1 caches each training image as it is" in line
               for line in lines) is said

"""Explanations: heatmaps from the base's last feature map, the closest training images, and
``graft predict --explain``. Small models made here; one real fit where the fit is what is
tested (does the heatmap point at the object?)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graftkit.outputs.closest import Closest, build, thumbnail
from graftkit.outputs.heatmaps import NoFeatureMap, class_maps, explain_batch, peak, upsample


def _graft(pool: bool = True, classes: int = 3, activation: str = "softmax"):
    """A tiny grafted model: a conv base named ``base`` (average-pooled, or flattened), then
    graftkit's head."""
    import keras

    from graftkit.graft import build_classifier

    x = keras.Input((32, 32, 3), name="pixels")
    y = keras.layers.Rescaling(1 / 255)(x)
    y = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_a")(y)
    y = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_b")(y)
    y = keras.layers.GlobalAveragePooling2D()(y) if pool else keras.layers.Flatten()(y)
    base = keras.Model(x, y, name="base")
    model = build_classifier(base, classes, activation=activation)
    rng = np.random.default_rng(0)
    model.get_layer("head_dense").set_weights(
        [rng.normal(size=(y.shape[-1], classes)).astype(np.float32),
         rng.normal(size=classes).astype(np.float32)])
    return model


def test_the_heatmap_weighs_the_channels_that_add_to_the_class():
    """The logits come back from the map as the head computes them; the heatmap is Grad-CAM++
    in closed form: a channel whose gradient is negative never lights a place up, and with
    one channel it is that channel's map, scaled."""
    rng = np.random.default_rng(0)
    maps = np.abs(rng.normal(size=(2, 5, 5, 8))).astype(np.float32)  # after a ReLU-like act
    kernel, bias = rng.normal(size=(8, 3)), rng.normal(size=3)
    batch = explain_batch(maps, kernel, bias, multi_label=False)
    raw = np.einsum("hwc,ck->khw", maps[0], kernel)
    assert np.allclose(raw.mean(axis=(1, 2)) + bias, batch.logits[0], atol=1e-5)
    assert np.allclose(batch.probs.sum(axis=1), 1.0, atol=1e-6)
    cams = class_maps(maps[0], kernel, [0, 2])
    assert cams.shape == (2, 5, 5) and cams.min() >= 0 and np.isclose(cams.max(), 1.0)
    one = np.zeros((8, 1))
    one[3] = 2.0
    only = class_maps(maps[0], one, [0])[0]
    assert np.allclose(only, maps[0][..., 3] / maps[0][..., 3].max(), atol=1e-6)
    assert not class_maps(maps[0], -one, [0]).any()  # evidence against: nothing lit
    heat = upsample(cams[0], 40)
    assert heat.shape == (40, 40) and 0 <= heat.min() and heat.max() <= 1
    hot = np.zeros((5, 5), np.float32)
    hot[1, 3] = 1.0
    x, y = peak(upsample(hot, 50))
    assert 30 <= x < 40 and 10 <= y < 20  # the peak stays where the map's hot cell is
    sig = explain_batch(maps, kernel, bias, multi_label=True)
    assert np.allclose(sig.probs, 1 / (1 + np.exp(-sig.logits)), atol=1e-6)


def test_the_peak_is_on_the_object_the_class_is_made_of():
    """A base built by hand whose one channel sees red: the heatmap of "red" peaks on the red
    square, wherever it is (the map, its upsampling and the peak keep x and y apart)."""
    import keras

    from graftkit.classifier import Classifier
    from graftkit.graft import build_classifier

    x = keras.Input((32, 32, 3), name="pixels")
    conv = keras.layers.Conv2D(2, 4, strides=4, activation="relu", name="sees_red")
    base = keras.Model(x, keras.layers.GlobalAveragePooling2D()(conv(x)), name="base")
    model = build_classifier(base, 2)
    w = np.zeros((4, 4, 3, 2), np.float32)
    w[..., 0, 0], w[..., 1, 0], w[..., 2, 0] = 1 / 16, -1 / 32, -1 / 32  # red minus the rest
    w[..., :, 1] = 1 / 48  # brightness
    conv.set_weights([w, np.zeros(2, np.float32)])
    model.get_layer("head_dense").set_weights([np.array([[1.0, -1.0], [0.0, 0.0]], np.float32),
                                               np.zeros(2, np.float32)])
    clf = Classifier(model, ["red", "other"])
    for left, top in ((20, 4), (0, 24), (12, 12)):
        img = np.full((32, 32, 3), 90, np.uint8)
        img[top:top + 8, left:left + 8] = (230, 30, 30)
        e = clf.explain(img, label="red", k=0)[0]
        px, py = e.peaks["red"]
        assert left <= px < left + 8 and top <= py < top + 8, (left, top, px, py)
        assert e.heatmaps["red"][top + 4, left + 4] > 0.9 > e.heatmaps["red"][31 - top, 31 - left]


def test_explain_answers_as_predict_does_from_the_same_pass(tmp_path):
    from graftkit.classifier import Classifier

    model = _graft()
    clf = Classifier(model, ["a", "b", "c"])
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    explained = clf.explain(images, top_k=2)
    predicted = clf.predict(images, top_k=2)
    assert len(explained) == 5 and explained.skipped == []
    for e, p in zip(explained, predicted):
        assert e.prediction.label == p.label and e.prediction.top_k[1][0] == p.top_k[1][0]
        assert e.prediction.probability == pytest.approx(p.probability, abs=1e-5)
        assert list(e.heatmaps) == [p.label] and e.heatmaps[p.label].shape == (32, 32)
        assert e.image.shape == (32, 32, 3) and e.closest is None  # no run folder: no bank
    asked = clf.explain(images[:1], label="c")[0]
    assert list(asked.heatmaps) == ["c"] and set(asked.peaks) == {"c"}
    assert json.dumps(asked.as_dict())  # JSON as it is
    from graftkit.errors import UsageError

    with pytest.raises(UsageError, match="unknown label 'd'"):
        clf.explain(images[:1], label="d")


def test_a_base_without_an_average_pooled_map_is_refused_with_a_reason():
    from graftkit.classifier import Classifier

    clf = Classifier(_graft(pool=False), ["a", "b", "c"])
    with pytest.raises(NoFeatureMap, match="no global average pooling"):
        clf.explain([np.zeros((32, 32, 3), np.uint8)])


def test_closest_training_images_find_themselves_first(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(5):
        path = tmp_path / f"t{i}.png"
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    features = rng.normal(size=(5, 16)).astype(np.float32)
    bank, thumbs = build(features, paths, ["x", "y", "x", "y", "x"])
    bank.save(tmp_path, thumbs)
    again = Closest.load(tmp_path)
    assert again is not None and again.paths == paths and again.labels[1] == "y"
    found = again.query(features[[3]] * 7.0, k=2)[0]  # scale does not matter: cosine
    assert found[0]["path"] == paths[3] and found[0]["similarity"] == pytest.approx(1.0, abs=2e-3)
    assert found[1]["similarity"] <= found[0]["similarity"] and len(found) == 2
    tile = thumbnail(tmp_path, 3)
    assert tile.shape == (64, 64, 3) and abs(int(tile.mean()) - 120) <= 3
    assert Closest.load(tmp_path / "nowhere") is None


@pytest.mark.integration
def test_predict_explain_writes_overlays_and_the_closest_images(trained_run, tmp_path, capsys):
    """A real run: graft predict --explain writes an overlay per image, lists the closest
    training images (the image itself first when it is one), and answers as predict does."""
    import graftkit
    from graftkit.cli import main

    run = trained_run / "run"
    clf = graftkit.load(run)
    some = [path for path, _ in json.loads((run / "split.json").read_text())["train"][:2]]
    explained = clf.explain(some)
    assert [e.prediction.label for e in explained] == [p.label for p in clf.predict(some)]
    assert explained[0].closest[0]["path"] == some[0]  # a training image finds itself
    assert explained[0].closest[0]["similarity"] == pytest.approx(1.0, abs=5e-3)
    out = tmp_path / "why"
    assert main(["predict", str(run), *some, "--explain", str(out), "--format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and len(rows[0]["closest"]) == 3
    assert rows[0]["closest"][0]["label"] in clf.classes
    written = Path(next(iter(rows[0]["heatmaps"].values())))
    assert written.parent == out and written.name.startswith(Path(some[0]).stem + ".")
    with Image.open(written) as img:
        assert img.size == (clf.image_size, clf.image_size)
    (tmp_path / "file").write_text("x")
    assert main(["predict", str(run), some[0], "--explain", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.integration
def test_a_users_own_base_is_explained_through_the_pooling_graftkit_added(tmp_path):
    """A base from a .keras file whose output is a 4-D map: graftkit pools it, and the
    heatmap comes from that map; a run fine-tuned above a cut explains the same way."""
    import keras

    import graftkit
    from tests.conftest import make_folder

    x = keras.Input((32, 32, 3))
    y = keras.layers.Rescaling(1 / 255)(x)
    for i in range(3):
        y = keras.layers.Conv2D(8 * (i + 1), 3, strides=2, padding="same", activation="relu",
                                name=f"block{i + 1}_conv")(y)
    path = tmp_path / "mine.keras"
    keras.Model(x, y, name="mine").save(path)
    data = make_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    graftkit.fit(data, run, base=str(path), head_epochs=3, fine_tune_epochs=1,
                 batch_size=8, verbose=0, log=lambda _m: None, label_folds=0)
    clf = graftkit.load(run)
    image = sorted(data.rglob("*.png"))[0]
    e = clf.explain(image)[0]
    assert e.prediction.label == clf.predict(image)[0].label
    assert e.heatmaps[e.prediction.label].shape == (32, 32) and len(e.closest) == 3
    assert (run / "explain" / "index.json").is_file()  # the report's heatmaps were written


def test_a_run_made_before_explanations_explains_without_closest_images(tmp_path, capsys):
    """A run folder of graftkit 0.1.0 has no closest.npz: heatmaps all the same, closest
    None, and the command says how to get them; --tta with --explain is refused up front."""
    import graftkit
    from graftkit.cli import main

    old = Path(__file__).parent / "data" / "run-0.1.0"
    cat = Path(__file__).parent / "data" / "chelsea_224.png"
    e = graftkit.load(old).explain(cat)[0]
    assert e.closest is None and list(e.heatmaps) == [e.prediction.label]
    assert main(["predict", str(old), str(cat), "--explain", str(tmp_path / "why")]) == 0
    out = capsys.readouterr().out
    assert "this run has none stored" in out and "graft fit again" in out
    assert len(list((tmp_path / "why").glob("chelsea_224.*.jpg"))) == 1
    assert main(["predict", str(old), str(cat), "--explain", str(tmp_path / "w2"),
                 "--tta"]) == 2
    assert "drop --tta" in capsys.readouterr().err
    assert not (tmp_path / "w2").exists()  # refused before anything was made


@pytest.mark.integration
def test_an_overwritten_run_never_shows_the_old_runs_heatmaps(trained_run, tmp_path,
                                                              monkeypatch):
    """--overwrite over a run with heatmaps, the new heatmaps failing: the report says the run
    has none (never the old run's), the failure is said, and the run is complete."""
    import shutil

    import graftkit
    from graftkit.classifier import Classifier
    from tests.conftest import TRAINED_RUN

    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    assert (run / "explain" / "index.json").is_file()

    def broken(self, *args, **kwargs):
        raise RuntimeError("no heatmaps today")

    monkeypatch.setattr(Classifier, "explain", broken)
    said: list[str] = []
    graftkit.fit(trained_run / "data", run, overwrite=True, verbose=0, log=said.append,
                 **{**TRAINED_RUN, "head_epochs": 2, "fine_tune_epochs": 0})
    assert any("no heatmaps (RuntimeError: no heatmaps today)" in m for m in said)
    assert not (run / "explain").exists() and (run / "metrics.json").is_file()
    page = (run / "report.html").read_text()
    assert "No heatmaps" in page and "class=heat" not in page

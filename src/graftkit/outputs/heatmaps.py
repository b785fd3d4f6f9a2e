"""Where the model looked: Grad-CAM++ on the base's last feature map, in closed form.

graftkit's head is average pooling, dropout and one Dense layer, so a class's logit is the
spatial mean of ``map @ kernel[:, c]`` plus its bias, and every derivative Grad-CAM++
(Chattopadhyay et al., WACV 2018) needs is known without a backward pass: the gradient of the
logit with respect to channel ``k`` of the map is ``g_k = kernel[k, c] / (h * w)`` at every
place, so each channel's weight is ``h * w * relu(g_k) / (2 + g_k * sum(map_k))`` and the
heatmap is ``relu(map @ weights)``. Measured on the localisation set of
``benchmarks/explain.py`` it points at the object more often than plain Grad-CAM (which for this
head is the class activation map, ``relu(map @ kernel[:, c])``): see docs/explain.md.

One forward pass up to the last feature map gives the heatmaps, the pooled features, the
probabilities and the open-set score together, so explaining an image costs about what
predicting it does.

The feature map is the input of the base's last average pooling; a base without one (flatten,
max pooling, attention pooling) has no map whose mean is the features, and is refused with a
message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graftkit.errors import RunError

if TYPE_CHECKING:
    import keras

    from graftkit.frozen.engine import FrozenPart
    from graftkit.frozen.precision import EngineFile


class NoFeatureMap(RunError):
    """The base has no average-pooled 4-D feature map to explain with."""


def feature_map_layer(base: keras.Model):
    """The base's last ``GlobalAveragePooling2D``, whose input is the feature map."""
    import keras

    from graftkit.backbones.registry import layers_within

    pools = [layer for layer in layers_within(base, leaves_only=True)
             if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise NoFeatureMap(
            f"the base {base.name} has no global average pooling: explanations need the 4-D "
            "feature map whose average is the features the head reads (a base that flattens "
            "or max-pools its map has none)")
    return pools[-1]


class FeatureMaps:
    """Pixels -> the base's last feature map, on the run's engine where it splits.

    Runs that fine-tuned the top blocks keep the pretrained bottom: it runs on the engine the
    fit converted (the same file ``predict`` uses), the top blocks in Keras. Runs with nothing
    above the cut run the whole map model on an engine of its own, converted once and cached.
    """

    def __init__(self, model: keras.Model, block_pattern: str, top_n: int,
                 engine_key: str | None = None, int8_engine: EngineFile | None = None):
        from graftkit.backbones.registry import block_groups
        from graftkit.frozen.cut import cut_model, first_above, part_key
        from graftkit.frozen.engine import FrozenPart, compiled, engine_path
        from graftkit.graft import BASE

        base = model.get_layer(BASE)
        pool = feature_map_layer(base)
        parts = cut_model(base, pool)
        if parts is None:
            raise NoFeatureMap(f"the feature map of {base.name} cannot be separated from its "
                               "pooling (it feeds more than the pooling)")
        to_map = parts[0]
        size = int(model.inputs[0].shape[1])
        self.rest = None
        bottom = to_map
        first = first_above(block_groups(base, block_pattern), top_n) if top_n > 0 else None
        if first is not None:
            cut = cut_model(to_map, first)
            if cut is not None:
                bottom, rest = cut
                self.rest = compiled(rest)
        if first is None or bottom is to_map:
            key = part_key(to_map, size, f"map:{pool.name}")
            int8_engine = None  # not the fit's frozen part: its own float32 engine
        else:
            key = engine_key if engine_key and engine_path(engine_key).is_file() else \
                part_key(bottom, size, first.name)
        self.frozen: FrozenPart = FrozenPart(bottom, key, engine_file=int8_engine)

    def plan(self, images: int) -> None:
        self.frozen.plan(images)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = self.frozen(np.ascontiguousarray(pixels, dtype=np.float32))[0]
        return self.rest(out)[0] if self.rest is not None else out


@dataclass
class Batch:
    """One pass's maps and what follows from them: the pooled features, the logits and the
    probabilities (the head's own arithmetic: the temperature is folded into its kernel)."""

    maps: np.ndarray  # (n, h, w, c)
    kernel: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    probs: np.ndarray

    def heatmaps(self, row: int, classes: list[int],
                 size: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The heatmaps of ``classes`` for image ``row`` at ``size`` px, and their peaks."""
        heats = [upsample(cam, size) for cam in class_maps(self.maps[row], self.kernel, classes)]
        return heats, [peak(h) for h in heats]


def explain_batch(maps: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                  multi_label: bool) -> Batch:
    maps = np.asarray(maps, dtype=np.float32)
    features = maps.mean(axis=(1, 2))
    logits = features.astype(np.float64) @ kernel + bias
    if multi_label:
        from graftkit.outputs.multilabel import sigmoid

        probs = sigmoid(logits)
    else:
        from graftkit.outputs.calibration import softmax

        probs = softmax(logits)
    return Batch(maps, kernel, features, logits, probs.astype(np.float32))


def class_maps(maps: np.ndarray, kernel: np.ndarray, classes: list[int]) -> np.ndarray:
    """``(len(classes), h, w)``: Grad-CAM++ of one image's map for each class, scaled to 0..1
    per class (an all-zero map stays zero). Only channels whose gradient is positive count:
    evidence against a class is not where the model looked for it."""
    a = maps.astype(np.float64)
    area = a.shape[0] * a.shape[1]
    g = kernel[:, classes].astype(np.float64) / area  # (c, classes): the logit's gradients
    alpha = 1.0 / (2.0 + g * a.sum(axis=(0, 1))[:, None])  # maps are >= 0 after the base's
    weights = area * np.maximum(g, 0.0) * alpha  # activation, so alpha > 0 where g > 0
    cam = np.maximum(np.einsum("hwc,ck->khw", a, weights), 0.0).astype(np.float32)
    top = cam.reshape(len(classes), -1).max(axis=1)
    return cam / np.where(top > 0, top, 1.0)[:, None, None]


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A map at ``size`` px (bilinear, as the model's view was made), 0..1."""
    from PIL import Image

    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR), dtype=np.float32).clip(0.0, 1.0)


def peak(heat: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the hottest place (the pointing game's point)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(x), int(y)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heatmap laid over it (uint8 RGB): cool colours where the model did
    not look, hot where it did, the image still visible under both."""
    from matplotlib import colormaps

    colour = colormaps["jet"](heat)[..., :3] * 255.0
    weight = alpha * (0.35 + 0.65 * heat[..., None])  # the cold parts stay lighter
    mixed = image.astype(np.float32) * (1 - weight) + colour * weight
    return mixed.clip(0, 255).astype(np.uint8)


def heat_png(heat: np.ndarray, px: int = 96) -> bytes:
    """The heatmap alone as a small RGBA PNG (its colour, opaque where the model looked):
    what a page lays over the image it already shows."""
    from matplotlib import colormaps

    small = upsample(heat, px)
    rgba = colormaps["jet"](small)
    rgba[..., 3] = 0.15 + 0.55 * small
    return png_bytes((rgba * 255).round().astype(np.uint8))


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)  # RGB or RGBA
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 88) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


EXPLAIN_DIR = "explain"  # the report's heatmaps, written at fit time
EXPLAIN_INDEX = "index.json"
REPORT_PX = 160  # side of a heatmap kept for the report


def write_explanations(run_dir: Path, explained) -> None:
    """``RUN/explain/``: each explained image's heatmaps (JPEG overlays) and closest training
    images, indexed by the image's path, for the report and ``graft report`` (no model)."""
    from PIL import Image

    from graftkit.files import atomic_write, write_json

    folder = Path(run_dir) / EXPLAIN_DIR
    folder.mkdir(exist_ok=True)
    index = {}
    for i, e in enumerate(explained):
        files = {}
        for j, (label, heat) in enumerate(e.heatmaps.items()):
            image = Image.fromarray(overlay(e.image, heat)).resize((REPORT_PX, REPORT_PX),
                                                                   Image.Resampling.BILINEAR)
            name = f"{i:03d}-{j}.jpg"
            data = jpeg_bytes(np.asarray(image), quality=85)
            atomic_write(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
            files[label] = name
        index[e.prediction.path] = {"predicted": e.prediction.label, "heatmaps": files,
                                    "closest": e.closest}
    write_json(folder / EXPLAIN_INDEX, index)


def read_explanations(run_dir: Path) -> dict:
    """``write_explanations``' index (empty for runs without one)."""
    import json

    path = Path(run_dir) / EXPLAIN_DIR / EXPLAIN_INDEX
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

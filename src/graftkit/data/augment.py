"""Augmented views of an image, each decided by the image's content digest and the view number.

A view does not depend on the run's seed, so the frozen outputs of a view can be cached and
reused by later runs on the same images.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps

from graftkit.defaults import AUGMENT, AUGMENT_PRESETS, AUGMENT_RANGES, AUGMENTATIONS
from graftkit.errors import UsageError


def parse_augment(spec: str | None) -> dict[str, float | bool]:
    """``"flip,rotation=0.1,zoom=0.2"`` -> settings; ``"none"`` or empty -> no augmentation.

    A preset name (``basic``, ``style``) adds its set; later names override earlier strengths
    (``"style,hue=0.1"``)."""
    if spec is None:
        return dict(AUGMENT)
    settings: dict[str, float | bool] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "none":
            return {}
        key, _, value = part.partition("=")
        if key in AUGMENT_PRESETS or key == "flip":
            if value:
                raise UsageError(f"--augment {part}: {key!r} takes no value; write {key}")
            settings.update(AUGMENT_PRESETS.get(key, {"flip": True}))
            continue
        if key not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {key!r} in --augment; use "
                             f"{', '.join(AUGMENTATIONS)} or a set: {', '.join(AUGMENT_PRESETS)}")
        try:
            settings[key] = float(value) if value else float(AUGMENTATIONS[key])
        except ValueError:
            raise UsageError(f"--augment {key}={value!r} is not a number") from None
    return check_augment(settings)


def check_augment(settings: dict[str, float | bool]) -> dict[str, float | bool]:
    """``settings`` unchanged if every strength is in its range, else one message that says which.

    A strength out of range would not fail: it would silently give repeated or broken views."""
    for key, value in settings.items():
        if key not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {key!r}; use {', '.join(AUGMENTATIONS)}")
        if key == "flip":
            continue
        low, high = AUGMENT_RANGES[key]
        try:
            strength = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--augment {key}={value!r} is not a number") from None
        if not low <= strength <= high:
            raise UsageError(f"--augment {key}={strength:g} is out of range: {key} takes {low:g} "
                             f"to {high:g} ({AUGMENTATIONS[key]:g} when given without a value)")
    return settings


def augment_image(image: np.ndarray, seed: int, settings: dict[str, float | bool]) -> np.ndarray:
    """One random view of a uint8 image, fully decided by ``seed``.

    The same function serves per-epoch augmentation and the cached augmented views, and a view
    depends only on its seed (not on batch or thread order), so cached views of an image are
    reusable across runs. Flip is horizontal; rotation is a fraction of a full turn, zoom a
    fraction of the side, contrast a fraction of the per-channel spread (the Keras layers'
    meanings); empty corners are filled by reflection, as Keras does.
    """
    rng = np.random.default_rng(seed)
    flip = bool(settings.get("flip")) and rng.random() < 0.5
    rotation = float(settings.get("rotation") or 0.0)
    zoom = float(settings.get("zoom") or 0.0)
    contrast = float(settings.get("contrast") or 0.0)
    angle = rng.uniform(-rotation, rotation) * 2 * np.pi
    scale = 1.0 + rng.uniform(-zoom, zoom)  # > 1 shows a larger area (zoom out)
    factor = 1.0 + rng.uniform(-contrast, contrast)
    out = image[:, ::-1] if flip else image
    if angle or scale != 1.0:
        h, w = out.shape[:2]
        pad = (h // 2, w // 2)
        padded = Image.fromarray(_reflect_pad(out, pad, pad))  # as np.pad(out, (pad, pad, (0, 0)))
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        cx, cy = w / 2 + pad[1], h / 2 + pad[0]
        # Output pixel (x, y) samples the padded input at centre + R(angle) * scale * offset.
        matrix = (cos, -sin, cx - cos * w / 2 + sin * h / 2,
                  sin, cos, cy - sin * w / 2 - cos * h / 2)
        out = np.asarray(padded.transform((w, h), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR))
    if factor != 1.0:
        out = _contrast(out, factor)
    # Drawn after the settings above, and only when asked for: views of the settings above
    # stay exactly as they were (and so do their cached frozen outputs).
    if settings.get("crop"):
        out = _random_resized_crop(out, rng, float(settings["crop"]))
    if any(settings.get(k) for k in ("brightness", "saturation", "hue", "grayscale")):
        out = _colour(out, rng, settings)
    if settings.get("augmix"):
        out = _augmix(out, rng, float(settings["augmix"]))
    return np.ascontiguousarray(out)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Each channel's spread around its mean scaled by ``factor``, through a table per channel.

    The table holds the same float64 arithmetic for the 256 values a channel can take, so the
    result is the one per pixel, at a tenth of the cost (the integer sums are exact, and so the
    mean is numpy's to the last bit); Pillow applies the three tables in one pass."""
    h, w = image.shape[:2]
    mean = image.sum(axis=0, dtype=np.uint32).sum(axis=0, dtype=np.int64) / (h * w)
    values = np.arange(256)[:, None]
    table = np.clip((values - mean) * factor + mean, 0, 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(image, "RGB").point(table.T.ravel().tolist()))


def _reflect_pad(image: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """``np.pad(image, (rows, cols, (0, 0)), mode="reflect")`` by slicing: the same pixels at a
    quarter of the cost (a view is augmented for every cached row)."""
    h, w = image.shape[:2]
    (top, bottom), (left, right) = rows, cols
    if not (0 < top <= h - 2 and 0 < bottom <= h - 2 and 0 < left <= w - 2 and 0 < right <= w - 2):
        return np.pad(image, (rows, cols, (0, 0)), mode="reflect")
    out = np.empty((h + top + bottom, w + left + right, image.shape[2]), image.dtype)
    out[top:top + h, left:left + w] = image
    out[top:top + h, :left] = image[:, left:0:-1]
    out[top:top + h, left + w:] = image[:, w - 2:w - 2 - right:-1]
    out[:top] = out[2 * top:top:-1]
    out[top + h:] = out[top + h - 2:top + h - 2 - bottom:-1]
    return out


def _random_resized_crop(image: np.ndarray, rng: np.random.Generator, loss: float) -> np.ndarray:
    """A crop of ``1 - loss`` to all of the area, aspect 3:4 to 4:3, resized back (Inception's)."""
    h, w = image.shape[:2]
    area = rng.uniform(1.0 - min(loss, 0.95), 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = min(w, max(1, round(w * np.sqrt(area * aspect))))
    ch = min(h, max(1, round(h * np.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y0 + ch, x0:x0 + cw]))
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))


def _colour(image: np.ndarray, rng: np.random.Generator, settings: dict) -> np.ndarray:
    """Colour changes that keep the shapes: what a change of style (paint, print, light) alters.

    Brightness adds up to that fraction of 255; saturation scales the distance from gray;
    hue turns the colour wheel by up to that fraction; grayscale, with that probability, keeps
    only the luminance (in three channels)."""
    brightness = float(settings.get("brightness") or 0.0)
    saturation = float(settings.get("saturation") or 0.0)
    hue = float(settings.get("hue") or 0.0)
    draws = rng.uniform(-1.0, 1.0, 3)
    gray_draw = rng.random()
    out = image.astype(np.float32) + draws[0] * brightness * 255.0
    if saturation:
        gray = (out @ _LUMA)[..., None]
        out = gray + (out - gray) * (1.0 + draws[1] * saturation)
    out = np.clip(out, 0, 255).round().astype(np.uint8)
    if hue:
        hsv = np.asarray(Image.fromarray(out).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(draws[2] * hue * 256)) % 256
        out = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if gray_draw < float(settings.get("grayscale") or 0.0):
        gray = np.clip((out.astype(np.float32) @ _LUMA).round(), 0, 255).astype(np.uint8)
        out = np.repeat(gray[..., None], 3, axis=-1)
    return out


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L"


def _augmix(image: np.ndarray, rng: np.random.Generator, severity: float) -> np.ndarray:
    """AugMix (Hendrycks et al., 2020): three chains of 1-3 random operations, mixed.

    The chains' images are blended with Dirichlet weights, and the blend with the original by a
    Beta draw, so the view keeps the image's content while its texture, contrast and tones change:
    made for robustness to corruptions (noise, blur, weather, compression). ``severity`` is the
    reference implementation's (0-10 scale, 3 by default) and so are the operations (its
    ``augmentations`` list: none of colour, contrast, brightness or sharpness). Pillow is used
    rather than ``keras.layers.AugMix``: that layer takes about 0.2 s per image outside a graph
    and gives another view for the same seed on a second call, and cached views must be
    reproducible."""
    weights = rng.dirichlet([1.0] * 3)
    keep = rng.beta(1.0, 1.0)
    start = Image.fromarray(image)
    mix = np.zeros(image.shape, np.float32)
    for weight in weights:
        chain = start
        for _ in range(int(rng.integers(1, 4))):
            op = _AUGMIX_OPS[int(rng.integers(len(_AUGMIX_OPS)))]
            chain = op(chain, float(rng.uniform(0.1, severity)) / 10.0, rng)
        mix += weight * np.asarray(chain, np.float32)
    out = (1.0 - keep) * image.astype(np.float32) + keep * mix
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)


# Each takes a level in [0, 1] (the reference's level / 10) and the maximum strengths of the
# reference: posterize to 4-1 bits, rotate 30 degrees, shear 0.3, translate a third of the side.
_AUGMIX_OPS = (
    lambda img, level, rng: ImageOps.autocontrast(img),
    lambda img, level, rng: ImageOps.equalize(img),
    lambda img, level, rng: ImageOps.posterize(img, max(1, 4 - int(level * 4))),
    lambda img, level, rng: img.rotate(_signed(level * 30, rng), Image.Resampling.BILINEAR),
    lambda img, level, rng: ImageOps.solarize(img, 256 - int(level * 256)),
    lambda img, level, rng: _affine(img, (1, _signed(level * 0.3, rng), 0, 0, 1, 0)),
    lambda img, level, rng: _affine(img, (1, 0, 0, _signed(level * 0.3, rng), 1, 0)),
    lambda img, level, rng: _affine(img, (1, 0, _signed(level * img.size[0] / 3, rng), 0, 1, 0)),
    lambda img, level, rng: _affine(img, (1, 0, 0, 0, 1, _signed(level * img.size[1] / 3, rng))),
)



def view_seed(digest: str, view: int) -> int:
    """The seed of augmented view ``view`` of the image with content digest ``digest``."""
    return int.from_bytes(hashlib.sha256(f"{digest}:{view}".encode()).digest()[:8], "little")

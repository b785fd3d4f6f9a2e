"""Augmented views of an image, each decided by the image's content digest and the view number.

A view does not depend on the run's seed, so the frozen outputs of a view can be cached and
reused by later runs on the same images.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from graftkit.defaults import AUGMENT
from graftkit.errors import UsageError


def parse_augment(spec: str | None) -> dict[str, float | bool]:
    """``"flip,rotation=0.1,zoom=0.2"`` -> settings; ``"none"`` or empty -> no augmentation."""
    if spec is None:
        return dict(AUGMENT)
    settings: dict[str, float | bool] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "none":
            return {}
        key, _, value = part.partition("=")
        if key not in AUGMENT:
            raise UsageError(f"unknown augmentation {key!r} in --augment; use {', '.join(AUGMENT)}")
        if key == "flip":
            settings[key] = True
            continue
        try:
            settings[key] = float(value) if value else float(AUGMENT[key])
        except ValueError:
            raise UsageError(f"--augment {key}={value!r} is not a number") from None
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
        padded = Image.fromarray(np.pad(out, (pad, pad, (0, 0)), mode="reflect"))
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        cx, cy = w / 2 + pad[1], h / 2 + pad[0]
        # Output pixel (x, y) samples the padded input at centre + R(angle) * scale * offset.
        matrix = (cos, -sin, cx - cos * w / 2 + sin * h / 2,
                  sin, cos, cy - sin * w / 2 - cos * h / 2)
        out = np.asarray(padded.transform((w, h), Image.AFFINE, matrix, Image.BILINEAR))
    if factor != 1.0:
        mean = out.reshape(-1, 3).mean(axis=0)
        out = np.clip((out - mean) * factor + mean, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(out)



def view_seed(digest: str, view: int) -> int:
    """The seed of augmented view ``view`` of the image with content digest ``digest``."""
    return int.from_bytes(hashlib.sha256(f"{digest}:{view}".encode()).digest()[:8], "little")

"""What a user may hand to ``predict``: a path, a folder, a PIL image, an array, a batch, or a
list of any of these. Files are decoded later by ``load_image`` (and unreadable ones skipped
with a reason, as the CLI does); images already in memory go through the same conversion here
(orientation, alpha, bilinear resize), so a picture gives the answer its file would (a large
JPEG file aside: ``load_image`` decodes it at reduced scale).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graftkit.errors import UsageError


@dataclass
class Inputs:
    """The images to score, in order: each a file (``paths[i]``) or pixels (``pixels[i]``)."""

    names: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    pixels: list[np.ndarray | None] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # files that cannot be read
    unchecked: bool = False  # files not decoded yet: scoring skips the ones that fail

    @classmethod
    def of_files(cls, paths: Iterable[str | os.PathLike]) -> Inputs:
        """Files already found readable (a scan, or ``gather`` itself): not probed again."""
        out = cls()
        for p in paths:
            out.add_file(str(p))
        return out

    def add_file(self, path: str) -> None:
        self.names.append(path)
        self.paths.append(path)
        self.pixels.append(None)

    def add_pixels(self, name: str, pixels: np.ndarray) -> None:
        self.names.append(name)
        self.paths.append(None)
        self.pixels.append(pixels)

    def checked(self) -> Inputs:
        """Itself, with any unchecked file decoded once to drop the unreadable ones: for
        work that cannot skip a file halfway (the Keras pipeline, heatmaps)."""
        if self.unchecked:
            from graftkit.data.images import check_images

            files = [(i, p) for i, p in enumerate(self.paths) if p is not None]
            reasons = check_images([p for _, p in files])
            self.drop({i: r for (i, _), r in zip(files, reasons) if r})
            self.unchecked = False
        return self

    def drop(self, reasons: dict[int, str]) -> None:
        """Remove the files at these rows, each listed in ``skipped`` with its reason."""
        for i in sorted(reasons):
            self.skipped.append({"path": str(self.paths[i]), "reason": reasons[i]})
        keep = [i for i in range(len(self.names)) if i not in reasons]
        self.names = [self.names[i] for i in keep]
        self.paths = [self.paths[i] for i in keep]
        self.pixels = [self.pixels[i] for i in keep]

    def image(self, i: int, size: int) -> np.ndarray:
        """Image ``i`` as the model takes it: the file decoded, or the pixels given."""
        from graftkit.data.images import load_image

        path, pixels = self.paths[i], self.pixels[i]
        if path is not None:
            return load_image(path, size)
        assert pixels is not None  # an image is a file or pixels
        return pixels


def _array_image(a: np.ndarray):
    """One image array, ``(H, W)``, ``(H, W, 1|3|4)``, raw 0-255 values (the model's input)."""
    from PIL import Image

    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            raise UsageError("an image array must hold finite numbers, raw 0-255 RGB values")
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    mode = {2: "L"}.get(a.ndim) or {3: "RGB", 4: "RGBA"}.get(a.shape[2] if a.ndim == 3 else 0)
    if mode is None:
        raise UsageError(f"an image array must be (height, width), (height, width, 3) or "
                         f"(height, width, 4), or a batch of them (got shape {a.shape})")
    return Image.fromarray(np.ascontiguousarray(a), mode)


def gather(images: Any, size: int, check: bool = True) -> Inputs:
    """``images`` as an ``Inputs`` list, in-memory images converted to ``size`` pixels; files
    probed once (unreadable ones go to ``skipped``), or with ``check=False`` left for scoring
    to skip as it decodes them (``Inputs.checked`` checks them later). An ``Inputs`` is
    returned as it is."""
    from PIL import Image

    from graftkit.data.images import expand_paths, model_pixels

    if isinstance(images, Inputs):
        return images
    out = Inputs(unchecked=not check)

    def add_paths(paths: list) -> None:
        found, skipped = expand_paths(paths, check)
        for f in found:
            out.add_file(f)
        out.skipped += skipped

    def add(item: Any, name: str) -> None:
        if isinstance(item, (str, os.PathLike)):
            add_paths([item])
        elif isinstance(item, Image.Image):
            label = getattr(item, "filename", "") or name
            out.add_pixels(str(label), model_pixels(item, size))
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            for i, one in enumerate(item):
                add(one, f"{name}[{i}]")
        elif isinstance(item, np.ndarray):
            out.add_pixels(name, model_pixels(_array_image(item), size))
        elif isinstance(item, Iterable) and not isinstance(item, (bytes, dict)):
            items = list(item)
            if items and all(isinstance(one, (str, os.PathLike)) for one in items):
                add_paths(items)  # checked together, on all cores
                return
            for i, one in enumerate(items):
                add(one, f"<image {i}>" if name == "<image>" else f"{name}[{i}]")
        else:
            raise UsageError(f"cannot read an image from a {type(item).__name__}: pass a file or "
                             "folder path, a PIL image, a numpy array (or a batch of them), or a "
                             "list of these")

    add(images, "<image>")
    return out

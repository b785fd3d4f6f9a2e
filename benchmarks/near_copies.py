"""``graft check``'s near-copy rule on photos, paintings, cartoons and sketches: false alarms on
real data, and planted copies found.

    .venv/bin/python benchmarks/near_copies.py [--datasets hymenoptera,flowers5,pacs_art,pacs_cartoon,sketches]

For each set (from ../shared/datasets; ``sketches`` are line drawings made from pacs_art's
paintings: edges, inverted, thresholded to black lines on white, the look of PACS' own sketch
domain), the check's scan runs once, then:
- flagged: validation images the rule calls nearly identical to a training image (a real set
  has few true near copies: these are mostly false alarms; the first ones are listed to look
  at), and of those, with another label (the "likely label error" finding);
- planted: 60 validation images copied into the training images as a recompressed JPEG
  (quality 70), a 90% resize, a brighter copy and a 2% crop; the share of those copies found.
Each rule is tried side by side: the difference hash alone (``NEAR_DUPLICATE_BITS``), and the
hash confirmed by the correlation of the two images' grayscale thumbnails at 0.8, 0.9, 0.95.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
sys.path.insert(0, str(HERE.parent / "src"))


def make_sketches(source: Path, target: Path) -> Path:
    for path in sorted(source.rglob("*.jpg")):
        img = ImageOps.grayscale(Image.open(path)).filter(ImageFilter.GaussianBlur(1.0))
        edges = np.asarray(img.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
        edges[:2], edges[-2:], edges[:, :2], edges[:, -2:] = 0, 0, 0, 0  # no frame
        ink = edges > np.percentile(edges, 98.5)  # the strongest edges: thin strokes
        drawing = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8))
        lines = Image.new("L", drawing.size, 255)  # drawn small, on a wide white page
        small = drawing.resize((drawing.width * 3 // 5, drawing.height * 3 // 5), Image.NEAREST)
        lines.paste(small, ((drawing.width - small.width) // 2,
                            (drawing.height - small.height) // 2))
        out = target / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        lines.save(out)
    return target


def plant(data: Path, n: int, seed: int) -> tuple[Path, list[str]]:
    """A copy of ``data`` with altered copies of ``n`` validation images among the training
    images (same class); returns the folder and the planted file names."""
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="planted-"))
    shutil.copytree(data, root / "d")
    val = sorted((root / "d" / "val").rglob("*.*"))
    planted = []
    for i, path in enumerate(rng.sample(val, min(n, len(val)))):
        img = Image.open(path).convert("RGB")
        kind = i % 4
        if kind == 1:
            img = img.resize((int(img.width * 0.9), int(img.height * 0.9)), Image.BILINEAR)
        elif kind == 2:
            img = ImageEnhance.Brightness(img).enhance(1.15)
        elif kind == 3:
            dx, dy = img.width // 50, img.height // 50
            img = img.crop((dx, dy, img.width - dx, img.height - dy))
        name = f"planted_{i}_{path.stem}.jpg"
        img.save(root / "d" / "train" / path.parent.name / name, "JPEG", quality=70)
        planted.append(name)
    return root / "d", planted


def flagged(folder, rule, correlation: float) -> list[tuple[str, list[str], bool]]:
    """(val image, matching train images, another label?) for each flagged val image."""
    from graftkit import defaults
    from graftkit.data import checks

    old = checks.near_copy_rule, defaults.NEAR_DUPLICATE_CORRELATION
    checks.near_copy_rule, defaults.NEAR_DUPLICATE_CORRELATION = rule, correlation
    try:
        found = checks._near_duplicates(folder)
    finally:
        checks.near_copy_rule, defaults.NEAR_DUPLICATE_CORRELATION = old
    out = {}
    for f in found:
        val = f.paths[0]
        entry = out.setdefault(val, [val, [], False])
        entry[1] += f.paths[1:]
        entry[2] = entry[2] or f.kind == "near_duplicate_labels"
    return [tuple(v) for v in out.values()]


def main() -> None:
    from graftkit.data import checks
    from graftkit.data.folder import scan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="hymenoptera,flowers5,pacs_art,pacs_cartoon,sketches")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="near-copies-"))
    rules = {"hash only": (checks.hash_only, 0.0),
             **{f"hash + correlation >= {c}": (checks.near_copy_rule, c)
                for c in (0.8, 0.9, 0.95)}}
    print("| set | images (train/val) | rule | val images flagged | with another label | "
          "planted copies found |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        data = make_sketches(SHARED / "pacs_art", work / "sketches") if name == "sketches" \
            else SHARED / name
        folder = scan(data, strict=False)
        if (data / "val").is_dir():
            planted_data, planted = plant(data, 60, seed=0)
            planted_folder = scan(planted_data, strict=False)
        else:
            planted_folder, planted = None, []
        for label, (rule, c) in rules.items():
            hits = flagged(folder, rule, c)
            found = "n/a (no val folder)"
            if planted_folder is not None:
                matched = {Path(m).name for _, ms, _ in flagged(planted_folder, rule, c)
                           for m in ms}
                found = f"{sum(p in matched for p in planted)}/{len(planted)}"
            print(f"| {name} | {len(folder.train)}/{len(folder.val)} | {label} | {len(hits)} | "
                  f"{sum(h[2] for h in hits)} | {found} |", flush=True)
            for val, matches, _ in hits[:3]:
                shown = [Path(x).relative_to(data).as_posix() for x in (val, matches[0])]
                print(f"|   | | e.g. | {shown[0]} ~ {shown[1]} | | |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

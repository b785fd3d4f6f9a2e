"""Peak memory of ``graft fit`` on a generated folder of many images (20,000 by default).

    .venv/bin/python benchmarks/memory.py [--images 20000] [-- extra graft fit options]

Writes the images (small JPEGs of five colour-and-texture classes, each resized to the
backbone's 224 px by the pipeline, so the work per image is the real one), runs ``graft fit``
with its defaults in a child process with an empty cache, and prints the child's peak RSS
with the sizes that explain it. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, count: int, classes: int = 5, side: int = 96, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 220, (classes, 3))
    for i in range(count):
        c = i % classes
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        stripes = (np.arange(side)[:, None] * (c + 1) // 8 % 2) * 40
        noise = rng.integers(0, 50, (side, side, 3))
        arr = np.clip(colours[c] + noise + stripes[..., None], 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=85)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("extra", nargs="*", help="more graft fit options (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        t = time.perf_counter()
        make_images(data, args.images)
        print(f"wrote {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
        env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(cache)}
        cmd = [sys.executable, "-m", "graftkit.cli", "fit", str(data), "--out",
               str(Path(tmp) / "run"), *args.extra]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            sys.exit(f"graft fit failed:\n{done.stderr[-3000:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        cache_mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
    print(f"graft fit on {args.images} images ({metrics['num_train']} train, "
          f"{metrics['num_val']} val), options {' '.join(args.extra) or '(defaults)'}")
    print(f"  peak RSS          {peak_mb:8.0f} MB")
    print(f"  wall              {wall:8.0f} s")
    print(f"  val accuracy      {metrics['val_accuracy']:8.4f}")
    print(f"  cache on disk     {cache_mb:8.0f} MB (frozen outputs, engines, converted weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

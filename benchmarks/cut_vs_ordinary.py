"""Phase 2 on cached activations at the cut against unfreezing the same blocks the ordinary way.

    .venv/bin/python benchmarks/cut_vs_ordinary.py ../shared/datasets/hymenoptera [--unfreeze 2]

Both runs are ``graft fit`` with the same options and seed, one after the other in this process:
(a) as shipped, the top blocks trained on the cached activations of the views; (b) with the cut
refused, so phase 2 runs every augmented image through the whole network (the frozen bottom in
inference mode, the top blocks trained), as ``model.fit`` on images would. Phase 1 is the same
in both. Prints phase-2 wall seconds, seconds per epoch, epochs run and accuracies, and the
ratios. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run(data: Path, unfreeze: int, epochs: int, cut: bool) -> dict:
    import graftkit.frozen.cut as features
    from graftkit.train.workflow import fit

    original = features.split_base

    def no_cut(base, pattern, top_n):
        return original(base, pattern, top_n) if top_n == 0 else None

    if not cut:  # fit imports split_base when it runs, so it gets this one
        features.split_base = no_cut
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = fit(data, Path(tmp) / "run", unfreeze=unfreeze, fine_tune_epochs=epochs,
                    verbose=0, log=lambda _m: None)
    finally:
        features.split_base = original
    ph = r.metrics["phases"][1]
    return {"seconds": ph["seconds"], "epochs": ph["epochs"],
            "per_epoch": ph["seconds"] / max(ph["epochs"], 1),
            "best": ph["best_val_accuracy"], "final": r.metrics["val_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    args = parser.parse_args()
    cut = run(args.data, args.unfreeze, args.fine_tune_epochs, cut=True)
    plain = run(args.data, args.unfreeze, args.fine_tune_epochs, cut=False)
    print(f"\n{args.data}: phase 2, top {args.unfreeze} blocks, up to {args.fine_tune_epochs} "
          "epochs (early stopping, patience 3)")
    print(f"{'':26}{'on cached activations':>24}{'ordinary':>12}{'ordinary/cut':>14}")
    for label, key, fmt in (("phase 2 wall s", "seconds", "{:.1f}"),
                            ("epochs run", "epochs", "{:d}"),
                            ("seconds per epoch", "per_epoch", "{:.2f}"),
                            ("best val acc (both phases)", "best", "{:.4f}"),
                            ("final val acc", "final", "{:.4f}")):
        ratio = plain[key] / cut[key] if cut[key] else float("nan")
        print(f"{label:26}{fmt.format(cut[key]):>24}{fmt.format(plain[key]):>12}{ratio:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

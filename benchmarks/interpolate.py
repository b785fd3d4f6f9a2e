"""Weight interpolation (WiSE-FT) between a head-only run and a fine-tuned run of the same data.

    .venv/bin/python benchmarks/defaults.py --settings unfreeze-all --datasets pacs_art --seeds 2 --keep runs/keep
    .venv/bin/graft fit ../shared/datasets/pacs_art --out runs/head-2 --seed 2 --mode head \\
        --dropout 0.2 --label-smoothing 0.1
    .venv/bin/python benchmarks/interpolate.py runs/head-2 runs/keep/pacs_art-unfreeze-all-2 \\
        --score ../shared/datasets/pacs_art/val ../shared/datasets/pacs_cartoon --alphas 0,0.5,0.75,1

Every weight becomes (1 - a) x head run + a x fine-tuned run, and the model is scored on each
``--score`` folder. The head run must be the fine-tuned run's phase 1: the same seed and head
settings with ``--mode head`` (with ``--unfreeze all`` the head's ``auto`` rules differ from the
default: add ``--dropout 0.2 --label-smoothing 0.1``). A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("head_run", help="the run folder of the head-only model (a = 0)")
    p.add_argument("fine_tuned_run", help="the run folder of the fine-tuned model (a = 1)")
    p.add_argument("--score", nargs="+", required=True, help="labelled folders to score on")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    args = p.parse_args()

    import graftkit
    from graftkit.classifier import Classifier
    from graftkit.errors import GraftError

    try:
        head, tuned = graftkit.load(args.head_run), graftkit.load(args.fine_tuned_run)
    except GraftError as exc:
        sys.exit(f"error: {exc}")
    w0, w1 = head.model.get_weights(), tuned.model.get_weights()
    if [w.shape for w in w0] != [w.shape for w in w1] or head.classes != tuned.classes:
        sys.exit("error: the two runs must share the backbone, image size and classes")
    for a in (float(x) for x in args.alphas.split(",")):
        tuned.model.set_weights([(1 - a) * x + a * y for x, y in zip(w0, w1)])
        mixed = Classifier(tuned.model, tuned.classes, fast=False)  # no engine cached for a mix
        scores = {folder: round(mixed.evaluate(folder)["accuracy"], 4) for folder in args.score}
        print(json.dumps({"alpha": a, **scores}), flush=True)


if __name__ == "__main__":
    main()

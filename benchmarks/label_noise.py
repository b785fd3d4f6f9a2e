"""The data loop, measured: wrong labels found, suggestions accepted and refit; new images labelled.

    .venv/bin/python benchmarks/label_noise.py detect [--sets flowers5,pacs_art,hymenoptera]
    .venv/bin/python benchmarks/label_noise.py refit  [--sets flowers5,pacs_art] [--seeds 0,1,2]
    .venv/bin/python benchmarks/label_noise.py inbox  [--seeds 0,1,2]
    .venv/bin/python benchmarks/label_noise.py variants [--sets flowers5,pacs_art,hymenoptera]
    .venv/bin/python benchmarks/label_noise.py table

**detect**: seeded noise in the *training* labels of ``../shared/datasets`` sets (validation
stays clean): symmetric 10% and 20% (each flipped image to another class at random) and 10%
between look-alike pairs (roses <-> tulips, dog <-> horse, ants <-> bees: 10% of each class of
the pair to the other). Three rankers of the training images, each scored by AUROC (flipped
vs. not), precision at k (k = flipped images), precision/recall of the flagged set and how
often the suggestion is the true class: graftkit's label issues (exactly what ``graft fit``
computes after a run: K-fold heads with the run's resolved phase-1 settings on the pretrained
features at its image size, the confident-learning rule); a 5-fold logistic regression on
pooled EfficientNet-Lite0 features at 224 px, the usual baseline (the same rule on its
probabilities); and, in ``refit``, the final model's own loss on its training images (fastai's
``top_losses``). The training images flagged that were not flipped are written out by name
(flowers5 has label errors of its own).

**refit**: real ``graftkit.fit`` runs with the defaults (``--seed`` = the noise seed) on the
clean folder, on the noisy one (10% symmetric; its ``label_issues.csv`` is graftkit's ranking
for the detect table too) and on the noisy one with every suggestion for a training image
accepted. Folders are symbolic links into ``../shared/datasets``, never copies; frozen
outputs are cached by file content, so the three share their frozen pass.

**variants**: on the same out-of-fold probabilities as ``detect``, how many training labels
are still wrong once every suggestion is accepted, under other flagging rules: the paper's rule
as graftkit runs it; it plus the images whose top class leads the given one by 0.5 or more
(``margin``); the paper's counting variants, prune by class (each class's
off-diagonal count of the confident joint, lowest self-confidence first) and prune by noise
rate (each pair's count, largest margin first), with raw and calibrated counts.

**inbox**: flowers5 with 20 labelled training images per class (seeded) and the other 1,500 as
an unlabelled inbox. A default ``graftkit.fit`` on the 100, then ``Classifier.suggest`` on the
inbox: how much of it "accept all with p >= X" labels, and how many of those labels are
right. Then the order: 4 rounds of 25 images labelled (with their true labels) in each order
(diverse, uncertain, random), a head retrained after each round on the cached features (what
``--mode head`` trains), validation accuracy after each round.

Each result is one JSON line in ``benchmarks/label-noise-runs.jsonl`` with the commit and the
CPU flags; ``table`` prints the tables of docs/data-loop.md. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from defaults import SHARED  # noqa: E402
from rows import append, log, mean_sd  # noqa: E402

RESULTS = HERE / "label-noise-runs.jsonl"
SCRATCH = Path(tempfile.gettempdir()) / "graftkit-bench" / "label-noise"
LOOKALIKE = {"flowers5": [("roses", "tulips")], "pacs_art": [("dog", "horse")],
             "hymenoptera": [("ants", "bees")]}
KINDS = ("symmetric-10", "symmetric-20", "lookalike-10")




# --- data --------------------------------------------------------------------------------


def clean(name: str):
    from graftkit.data.folder import scan

    return scan(SHARED / name)


def noisy_labels(labels: list[int], classes: list[str], kind: str, seed: int,
                 name: str) -> np.ndarray:
    """The training labels with seeded noise of ``kind``."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    if kind.startswith("symmetric"):
        rate = int(kind.split("-")[1]) / 100
        flip = rng.choice(len(y), int(round(rate * len(y))), replace=False)
        for i in flip:
            noisy[i] = rng.choice([c for c in range(len(classes)) if c != y[i]])
        return noisy
    rate = int(kind.split("-")[1]) / 100
    for a, b in LOOKALIKE[name]:
        ia, ib = classes.index(a), classes.index(b)
        for src, dst in ((ia, ib), (ib, ia)):
            rows = np.flatnonzero(y == src)
            noisy[rng.choice(rows, int(round(rate * len(rows))), replace=False)] = dst
    return noisy


def linked_folder(target: Path, train: list[tuple[str, str]], val: list[tuple[str, str]]) -> Path:
    """``target/{train,val}/<class>/<file>`` as symbolic links to the given (path, class)."""
    if target.exists():
        shutil.rmtree(target)
    for split, items in (("train", train), ("val", val)):
        for path, label in items:
            d = target / split / label
            d.mkdir(parents=True, exist_ok=True)
            link = d / Path(path).name
            n = 0
            while link.exists():
                n += 1
                link = d / f"{Path(path).stem}-{n}{Path(path).suffix}"
            os.symlink(path, link)
    return target


# --- scoring a ranking ---------------------------------------------------------------------


def auroc(flipped: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, score))


def scores(flipped: np.ndarray, suspicion: np.ndarray, flagged: np.ndarray,
           suggested: np.ndarray | None, truth: np.ndarray) -> dict:
    """Figures of a ranking of the training images: ``suspicion`` high = likely wrong."""
    k = int(flipped.sum())
    top = np.argsort(-suspicion, kind="stable")[:k]
    out = {"flipped": k, "auroc": auroc(flipped, suspicion),
           "precision_at_k": float(flipped[top].mean()),
           "flagged": int(flagged.sum())}
    out["precision"] = float(flipped[flagged].mean()) if flagged.any() else None
    out["recall"] = float(flagged[flipped].mean())
    found = flagged & flipped
    out["suggestion_right"] = (float((suggested[found] == truth[found]).mean())
                               if suggested is not None and found.any() else None)
    return out


def confident(probs: np.ndarray, given: np.ndarray, n_train: int):
    """The confident-learning rule over train + val; its findings restricted to training."""
    from graftkit.labels.issues import confident_learning

    flagged_idx, suggested = confident_learning(probs, given)
    flagged = np.zeros(len(given), bool)
    flagged[flagged_idx] = True
    p_given = probs[np.arange(len(given)), given]
    return flagged[:n_train], suggested[:n_train], -p_given[:n_train]


def head_settings(folder, size: int):
    """Phase 1's settings as a default fit of ``folder`` resolves them."""
    from graftkit.train.cross_fit import HeadSettings
    from graftkit.train.stages import resolve_auto
    from graftkit.train.workflow import make_options

    options = resolve_auto(make_options(), len(folder.train), size).options
    return HeadSettings(options.head_epochs, float(options.lr), float(options.dropout),
                        options.batch_size, options.training(), None), options


def default_size(folder) -> int:
    from graftkit.backbones import REGISTRY
    from graftkit.train.stages import auto_image_size

    return auto_image_size(folder, REGISTRY["efficientnet_lite0"].input_size)[0]


def logistic_oof(features: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from graftkit.train.cross_fit import stratified_folds

    fold = stratified_folds(labels, 5, seed)
    probs = np.zeros((len(labels), labels.max() + 1))
    for k in range(5):
        fit, held = fold != k, fold == k
        scaler = StandardScaler().fit(features[fit])
        model = LogisticRegression(max_iter=3000).fit(scaler.transform(features[fit]), labels[fit])
        probs[np.ix_(held, model.classes_)] = model.predict_proba(scaler.transform(features[held]))
    return probs


# --- detect ------------------------------------------------------------------------------


def detect(name: str, seeds: list[int]) -> None:
    from graftkit.train.cross_fit import out_of_fold, pooled_features

    folder = clean(name)
    size = default_size(folder)
    settings, _ = head_settings(folder, size)
    quiet = lambda _m: None  # noqa: E731
    ours = pooled_features(folder, image_size=size, log=quiet)
    base224 = pooled_features(folder, image_size=224, log=quiet)
    truth = np.asarray(folder.train.labels)
    val = np.asarray(folder.val.labels)
    n = len(truth)
    for kind in KINDS:
        for seed in seeds:
            y = noisy_labels(folder.train.labels, folder.classes, kind, seed, name)
            flipped = y != truth
            given = np.concatenate([y, val])
            start = time.perf_counter()
            probs = out_of_fold(ours, given, len(folder.classes), settings, seed=seed)
            seconds = time.perf_counter() - start
            flagged, suggested, suspicion = confident(probs, given, n)
            row = {"task": "detect", "set": name, "kind": kind, "seed": seed,
                   "method": "graftkit", "image_size": size, "seconds": round(seconds, 2),
                   **scores(flipped, suspicion, flagged, suggested, truth),
                   "false_flags": [folder.train.paths[i] for i in
                                   np.flatnonzero(flagged & ~flipped)]}
            record(row)
            log(f"{name} {kind} s{seed} graftkit: auroc {row['auroc']:.3f} p@k "
                f"{row['precision_at_k']:.3f} flagged {row['flagged']} prec {row['precision']} "
                f"rec {row['recall']:.3f} sugg {row['suggestion_right']} ({seconds:.1f} s)")
            probs = logistic_oof(base224, given, seed)
            flagged, suggested, suspicion = confident(probs, given, n)
            row = {"task": "detect", "set": name, "kind": kind, "seed": seed,
                   "method": "logistic-224", **scores(flipped, suspicion, flagged, suggested,
                                                      truth)}
            record(row)
            log(f"{name} {kind} s{seed} logistic: auroc {row['auroc']:.3f} p@k "
                f"{row['precision_at_k']:.3f} flagged {row['flagged']} prec {row['precision']}")


# --- variants of the flagging rule ----------------------------------------------------------


def confident_joint(probs: np.ndarray, given: np.ndarray, calibrated: bool) -> np.ndarray:
    """Counts of (given, likeliest class above its threshold); calibrated: rows scaled to the
    number of images given each class (the paper's calibration)."""
    from graftkit.labels.issues import thresholds

    above = probs >= thresholds(probs, given)
    likeliest = np.where(above, probs, -1.0).argmax(axis=1)
    joint = np.zeros((probs.shape[1],) * 2)
    np.add.at(joint, (given[above.any(axis=1)], likeliest[above.any(axis=1)]), 1)
    if calibrated:
        counts = np.bincount(given, minlength=probs.shape[1])[:, None]
        joint = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * counts
    return joint


def flag_rule(rule: str, probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged indices, suggested class of every image)`` under ``rule``."""
    from graftkit.labels.issues import confident_learning

    rows = np.arange(len(given))
    others = probs.copy()
    others[rows, given] = -1.0
    best_other = others.argmax(axis=1)
    flagged, suggested = confident_learning(probs, given)
    if rule == "paper":
        return flagged, suggested
    if rule == "margin":
        lead = (probs.argmax(axis=1) != given) & (probs.max(axis=1) - probs[rows, given] >= 0.5)
        extra = np.setdiff1d(np.flatnonzero(lead), flagged)
        suggested = suggested.copy()
        suggested[extra] = best_other[extra]
        return np.union1d(flagged, extra), suggested
    kind, calibration = rule.rsplit("-", 1)
    joint = confident_joint(probs, given, calibration == "calibrated")
    p_given = probs[rows, given]
    out: set[int] = set()
    for i in range(probs.shape[1]):
        mine = np.flatnonzero(given == i)
        if kind == "by-class":
            n = int(round(joint[i].sum() - joint[i, i]))
            out |= set(mine[np.argsort(p_given[mine], kind="stable")[:n]].tolist())
            continue
        for j in range(probs.shape[1]):
            if j != i:
                margin = probs[mine, j] - probs[mine, i]
                n = int(round(joint[i, j]))
                out |= set(mine[np.argsort(-margin, kind="stable")[:n]].tolist())
    return np.array(sorted(out), dtype=np.int64), best_other


VARIANTS = ("paper", "margin", "by-class-raw", "by-class-calibrated", "by-noise-rate-raw",
            "by-noise-rate-calibrated")


def variants(name: str, seeds: list[int]) -> None:
    from graftkit.train.cross_fit import out_of_fold, pooled_features

    folder = clean(name)
    size = default_size(folder)
    settings, _ = head_settings(folder, size)
    features = pooled_features(folder, image_size=size, log=lambda _m: None)
    truth = np.asarray(folder.train.labels)
    n = len(truth)
    for kind in KINDS:
        for seed in seeds:
            y = noisy_labels(folder.train.labels, folder.classes, kind, seed, name)
            given = np.concatenate([y, np.asarray(folder.val.labels)])
            probs = out_of_fold(features, given, len(folder.classes), settings, seed=seed)
            wrong = {}
            for rule in VARIANTS:
                flagged, suggested = flag_rule(rule, probs, given)
                fixed = y.copy()
                train = flagged[flagged < n]
                fixed[train] = suggested[train]
                wrong[rule] = int((fixed != truth).sum())
            record({"task": "variants", "set": name, "kind": kind, "seed": seed,
                    "still_wrong": wrong})
            log(f"{name} {kind} s{seed} still wrong: " +
                ", ".join(f"{r} {w}" for r, w in wrong.items()))


# --- refit -------------------------------------------------------------------------------


def fit_run(data: Path, out: Path, seed: int) -> dict:
    import graftkit

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    clf = graftkit.fit(data, out, seed=seed, verbose=0, log=lambda _m: None)
    m = clf.metrics
    return {"val_accuracy": m["val_accuracy"], "seconds": round(time.perf_counter() - start, 1),
            "label_issues": m.get("label_issues"), "clf": clf}


def refit(name: str, seeds: list[int]) -> None:
    from graftkit.labels.issues import read_csv

    folder = clean(name)
    truth = np.asarray(folder.train.labels)
    classes = folder.classes
    val = [(p, classes[y]) for p, y in zip(folder.val.paths, folder.val.labels)]
    kind = "symmetric-10"
    for seed in seeds:
        y = noisy_labels(folder.train.labels, classes, kind, seed, name)
        flipped = y != truth
        root = SCRATCH / f"{name}-s{seed}"
        runs = {}
        clean_dir = linked_folder(root / "clean", [(p, classes[t]) for p, t in
                                                   zip(folder.train.paths, truth)], val)
        noisy_dir = linked_folder(root / "noisy", [(p, classes[t]) for p, t in
                                                   zip(folder.train.paths, y)], val)
        runs["clean"] = fit_run(clean_dir, root / "run-clean", seed)
        log(f"{name} s{seed} clean fit: {runs['clean']['val_accuracy']:.4f} "
            f"({runs['clean']['seconds']} s)")
        runs["noisy"] = fit_run(noisy_dir, root / "run-noisy", seed)
        log(f"{name} s{seed} noisy fit: {runs['noisy']['val_accuracy']:.4f} "
            f"({runs['noisy']['seconds']} s; label issues {runs['noisy']['label_issues']})")
        # graftkit's ranking as the fit wrote it: label_issues.csv, back to the source files
        issues = read_csv(root / "run-noisy" / "label_issues.csv")
        source = {str(p): i for i, p in enumerate(folder.train.paths)}
        flagged, suggested = accepted(issues, source, y, classes)
        suspicion = np.zeros(len(truth))  # the fit's own order: flagged by rank, then the rest
        for issue in issues:
            if issue.split == "train":
                suspicion[source[os.path.realpath(issue.path)]] = 2 - issue.rank / (len(issues) + 1)
        clf = runs["noisy"]["clf"]
        probs = clf.predict_proba(folder.train.paths)
        losses = -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))
        fixed = [(p, classes[s]) for p, s in zip(folder.train.paths, suggested)]
        cleaned_dir = linked_folder(root / "cleaned", fixed, val)
        runs["cleaned"] = fit_run(cleaned_dir, root / "run-cleaned", seed)
        log(f"{name} s{seed} suggestions accepted: {runs['cleaned']['val_accuracy']:.4f} "
            f"({int(flagged.sum())} relabelled, {int((suggested != truth).sum())} still wrong)")
        # the loop once more: the refit's own label issues accepted, and a second refit
        again, suggested2 = accepted(read_csv(root / "run-cleaned" / "label_issues.csv"), source,
                                     suggested, classes)
        second_dir = linked_folder(root / "cleaned-2", [
            (p, classes[s]) for p, s in zip(folder.train.paths, suggested2)], val)
        runs["cleaned_2"] = fit_run(second_dir, root / "run-cleaned-2", seed)
        log(f"{name} s{seed} second round: {runs['cleaned_2']['val_accuracy']:.4f} "
            f"({int(again.sum())} relabelled, {int((suggested2 != truth).sum())} still wrong)")
        fit_scores = scores(flipped, suspicion, flagged, suggested, truth)
        fit_scores["auroc_note"] = "AUROC of the flagged order only (unflagged tie at 0)"
        record({"task": "refit", "set": name, "kind": kind, "seed": seed,
                "clean": runs["clean"]["val_accuracy"], "noisy": runs["noisy"]["val_accuracy"],
                "cleaned": runs["cleaned"]["val_accuracy"],
                "seconds": {k: v["seconds"] for k, v in runs.items()},
                "label_issues": runs["noisy"]["label_issues"],
                "relabelled": int(flagged.sum()),
                "still_wrong": int((suggested != truth).sum()), "fit_ranking": fit_scores,
                "cleaned_2": runs["cleaned_2"]["val_accuracy"],
                "relabelled_2": int(again.sum()),
                "still_wrong_2": int((suggested2 != truth).sum())})
        record({"task": "detect", "set": name, "kind": kind, "seed": seed,
                "method": "top-losses", **scores(flipped, losses, np.zeros(len(y), bool), None,
                                                 truth)})
        for run in ("run-clean", "run-noisy", "run-cleaned", "run-cleaned-2"):
            shutil.rmtree(root / run, ignore_errors=True)


def accepted(issues, source: dict[str, int], labels: np.ndarray, classes: list[str]):
    """``(flagged, labels with every training image's suggestion accepted)``."""
    flagged = np.zeros(len(labels), bool)
    out = labels.copy()
    for issue in issues:
        if issue.split != "train":
            continue
        i = source[os.path.realpath(issue.path)]
        flagged[i] = True
        out[i] = classes.index(issue.suggested)
    return flagged, out


# --- inbox -------------------------------------------------------------------------------


def inbox(seeds: list[int], per_class: int = 20, rounds: int = 4, batch: int = 25) -> None:
    from graftkit.labels.inbox import order
    from graftkit.train.cross_fit import HeadSettings, fit_head, head_probabilities, pooled_features

    name = "flowers5"
    folder = clean(name)
    classes = folder.classes
    truth = np.asarray(folder.train.labels)
    val = [(p, classes[y]) for p, y in zip(folder.val.paths, folder.val.labels)]
    size = default_size(folder)
    features = pooled_features(folder, image_size=size, log=lambda _m: None)
    f_train, f_val = features[:len(truth)], features[len(truth):]
    y_val = np.asarray(folder.val.labels)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        labelled = np.concatenate([rng.choice(np.flatnonzero(truth == c), per_class, replace=False)
                                   for c in range(len(classes))])
        rest = np.setdiff1d(np.arange(len(truth)), labelled)
        # accept all with p >= X: a default graft fit on the labelled images, suggest on the rest
        root = SCRATCH / f"inbox-s{seed}"
        data = linked_folder(root / "data", [(folder.train.paths[i], classes[truth[i]])
                                             for i in labelled], val)
        box = root / "inbox"
        box.mkdir(parents=True, exist_ok=True)
        names = {}
        for i in rest:
            link = box / f"{i:05d}{Path(folder.train.paths[i]).suffix}"
            if not link.exists():
                os.symlink(folder.train.paths[i], link)
            names[str(link)] = i
        run = fit_run(data, root / "run", seed)
        start = time.perf_counter()
        found = run["clf"].suggest(str(box))
        seconds = time.perf_counter() - start
        accept = {}
        for p in (0.8, 0.9, 0.95, 0.99):
            taken = [s for s in found if s.known and s.probability >= p]
            right = sum(classes.index(s.suggested) == truth[names[s.path]] for s in taken)
            accept[str(p)] = {"labelled": len(taken), "share": len(taken) / len(found),
                              "right": right / len(taken) if taken else None}
        unknown = [s for s in found if not s.known]
        record({"task": "inbox-accept", "set": name, "seed": seed, "labelled_start": len(labelled),
                "inbox": len(found), "val_accuracy": run["val_accuracy"],
                "fit_seconds": run["seconds"], "suggest_seconds": round(seconds, 1),
                "accept": accept, "unknown": len(unknown),
                "unknown_right": (sum(classes.index(s.suggested) == truth[names[s.path]]
                                      for s in unknown) / len(unknown)) if unknown else None})
        log(f"inbox s{seed}: fit {run['val_accuracy']:.4f}; accept p>=0.9 labels "
            f"{accept['0.9']['share']:.1%} of the inbox, {accept['0.9']['right']} right")
        # the order: rounds of labelling, a head retrained on cached features after each
        settings = HeadSettings()
        for how in ("diverse", "uncertain", "random"):
            have, pool, curve = list(labelled), list(rest), []
            for r in range(rounds + 1):
                head = fit_head(f_train[have], truth[have], len(classes), settings, seed)
                acc = float((head_probabilities(head, f_val).argmax(1) == y_val).mean())
                curve.append(acc)
                if r == rounds:
                    break
                probs = head_probabilities(head, f_train[pool])
                picked = order(probs, f_train[pool], how, seed=seed + r)[:batch]
                chosen = [pool[j] for j in picked]
                have += chosen
                pool = [i for i in pool if i not in set(chosen)]
            record({"task": "inbox-order", "set": name, "seed": seed, "order": how,
                    "batch": batch, "curve": curve})
            log(f"inbox s{seed} {how}: " + " ".join(f"{a:.4f}" for a in curve))


# --- the tables --------------------------------------------------------------------------



def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines()
            if line.strip()] if RESULTS.is_file() else []
    out = []
    detect_rows = _latest([r for r in rows if r["task"] == "detect"],
                          ("set", "kind", "method", "seed"))
    out.append("| set | noise | method | seeds | AUROC | precision at k | flagged | precision | "
               "recall | suggestion right |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in detect_rows:
        groups.setdefault((r["set"], r["kind"], r["method"]), []).append(r)
    order = {"flowers5": 0, "pacs_art": 1, "hymenoptera": 2, **{k: 3 + i for i, k in
                                                               enumerate(KINDS)},
             "graftkit": 0, "logistic-224": 1, "top-losses": 2}
    for (name, kind, method), rs in sorted(groups.items(),
                                           key=lambda g: tuple(order.get(k, 9) for k in g[0])):
        ranks_only = method == "top-losses"  # a ranking, no flagged set, no suggestion
        flagged = "-" if ranks_only else f"{statistics.mean(r['flagged'] for r in rs):.0f}"
        recall = "-" if ranks_only else _mean(r["recall"] for r in rs)
        out.append(f"| {name} | {kind} | {method} | {len(rs)} | {_mean(r['auroc'] for r in rs)} | "
                   f"{_mean(r['precision_at_k'] for r in rs)} | {flagged} | "
                   f"{_mean(r['precision'] for r in rs)} | {recall} | "
                   f"{_mean(r['suggestion_right'] for r in rs)} |")
    refits = _latest([r for r in rows if r["task"] == "refit"], ("set", "seed"))
    if refits:
        out += ["", "| set | seeds | clean fit | noisy fit (10%) | suggestions accepted | "
                "relabelled | still wrong | second round | relabelled | still wrong | "
                "label issues, s of the run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        by_set: dict[str, list[dict]] = {}
        for r in refits:
            by_set.setdefault(r["set"], []).append(r)
        for name, rs in sorted(by_set.items()):
            cost = statistics.mean(r["label_issues"]["seconds"] for r in rs)
            run = statistics.mean(r["seconds"]["noisy"] for r in rs)
            two = [r for r in rs if "cleaned_2" in r]
            second = (f"{_mean((r['cleaned_2'] for r in two), 4)} | "
                      f"{statistics.mean(r['relabelled_2'] for r in two):.0f} | "
                      f"{statistics.mean(r['still_wrong_2'] for r in two):.0f}"
                      ) if len(two) == len(rs) else "- | - | -"
            out.append(f"| {name} | {len(rs)} | {_mean((r['clean'] for r in rs), 4)} | "
                       f"{_mean((r['noisy'] for r in rs), 4)} | "
                       f"{_mean((r['cleaned'] for r in rs), 4)} | "
                       f"{statistics.mean(r['relabelled'] for r in rs):.0f} | "
                       f"{statistics.mean(r['still_wrong'] for r in rs):.0f} | {second} | "
                       f"{cost:.1f} of {run:.0f} ({cost / run:.1%}) |")
    tried = _latest([r for r in rows if r["task"] == "variants"], ("set", "kind", "seed"))
    if tried:
        out += ["", "still wrong after accepting | " + " | ".join(VARIANTS) + " |",
                "|---|" + "---|" * len(VARIANTS)]
        by_case: dict[tuple, list[dict]] = {}
        for r in tried:
            by_case.setdefault((r["set"], r["kind"]), []).append(r)
        for (name, kind), rs in by_case.items():
            out.append(f"| {name} {kind} ({len(rs)} seeds) | " + " | ".join(
                f"{statistics.mean(r['still_wrong'][v] for r in rs):.1f}" for v in VARIANTS)
                + " |")
    accepts = _latest([r for r in rows if r["task"] == "inbox-accept"], ("seed",))
    if accepts:
        out += ["", "| accept all with p >= | share of the inbox labelled | labels right |",
                "|---|---|---|"]
        for p in ("0.8", "0.9", "0.95", "0.99"):
            out.append(f"| {p} | {_mean(r['accept'][p]['share'] for r in accepts)} | "
                       f"{_mean(r['accept'][p]['right'] for r in accepts)} |")
    orders = _latest([r for r in rows if r["task"] == "inbox-order"], ("order", "seed"))
    if orders:
        out += ["", "| order | seeds | " + " | ".join(f"after {25 * i}" for i in range(5)) + " |",
                "|---|---|" + "---|" * 5]
        by_order: dict[str, list[dict]] = {}
        for r in orders:
            by_order.setdefault(r["order"], []).append(r)
        for how, rs in by_order.items():
            out.append(f"| {how} | {len(rs)} | " + " | ".join(
                _mean(r["curve"][i] for r in rs) for i in range(len(rs[0]["curve"]))) + " |")
    flags = sorted({r["cpu_flags"] for r in rows})
    out += ["", f"CPU flags: {'; '.join(flags) or '-'}"]
    return "\n".join(out)


def _latest(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The last row measured for each ``key`` (a later run replaces an earlier one)."""
    last = {tuple(r[k] for k in key): r for r in rows}
    return list(last.values())


def record(row: dict) -> None:
    append(RESULTS, row)


def _mean(values, digits: int = 3) -> str:
    return mean_sd(values, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("detect", "refit", "variants", "inbox", "table"))
    parser.add_argument("--sets", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.task == "table":
        print(table())
        return
    if args.task == "inbox":
        inbox(seeds)
        return
    names = (args.sets or ("flowers5,pacs_art" if args.task == "refit"
                           else "flowers5,pacs_art,hymenoptera")).split(",")
    task = {"detect": detect, "refit": refit, "variants": variants}[args.task]
    for name in names:
        task(name, seeds)


if __name__ == "__main__":
    main()

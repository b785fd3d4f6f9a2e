"""``graft check``: what is wrong with an image folder, before any training time is spent.

Built on the scan that ``graft fit`` does anyway (every image decoded once), so the same report
comes at the start of every fit for free. Severity decides the exit code of ``graft check``:
0 clean (notes only), 1 warnings, 2 fatal.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from graftkit import defaults
from graftkit.data.folder import ImageFolder, scan

FATAL, WARNING, NOTE = "fatal", "warning", "note"
EXIT_CODES = {NOTE: 0, WARNING: 1, FATAL: 2}


@dataclass
class Finding:
    severity: str
    kind: str
    message: str
    paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"severity": self.severity, "kind": self.kind, "message": self.message,
                "paths": self.paths}


@dataclass
class CheckReport:
    """Counts per class and split, and the findings, worst first."""

    data: str
    split: str
    counts: dict[str, dict[str, int]]
    findings: list[Finding]

    @property
    def status(self) -> str:
        severities = {f.severity for f in self.findings}
        return next((s for s in (FATAL, WARNING) if s in severities), "clean")

    @property
    def exit_code(self) -> int:
        return {"clean": 0, WARNING: 1, FATAL: 2}[self.status]

    def groups(self, examples: int = 3) -> list[dict]:
        """Findings of one kind as one entry: a count, one line, a few example paths.

        What a person reads (and what ``metrics.json`` keeps); ``as_dict`` has every finding.
        """
        by_kind: dict[tuple[str, str], list[Finding]] = defaultdict(list)
        for f in self.findings:
            by_kind[(f.severity, f.kind)].append(f)
        out = []
        for (severity, kind), found in by_kind.items():
            message = found[0].message if len(found) == 1 or kind not in GROUP_TITLES else \
                f"{len(found)} {GROUP_TITLES[kind]}"
            shown = [p for f in found[:examples] for p in f.paths[:2]]
            out.append({"severity": severity, "kind": kind, "count": len(found),
                        "message": message, "examples": shown})
        return out

    def as_dict(self) -> dict:
        return {"data": self.data, "split": self.split, "status": self.status,
                "exit_code": self.exit_code, "counts": self.counts,
                "summary": self.groups(), "findings": [f.as_dict() for f in self.findings]}


# How several findings of one kind read as one line ("12 " + title).
GROUP_TITLES = {
    "unreadable": "unreadable files, skipped",
    "conflicting_labels": "identical images with different labels",
    "leak": "exact duplicates across splits (train, val, test): the held-out figure "
            "overstates accuracy",
    "duplicate": "exact duplicates inside a split",
    "near_duplicate": "validation images nearly identical to a training image: validation "
                      "overstates accuracy",
    "near_duplicate_labels": "validation images nearly identical to a training image with "
                             "another label: likely label errors",
    "label_issue": "labels that look wrong (graft check --labels: heads that did not train on "
                   "the image disagree with its label)",
    "fatal": "fatal problems",
}


def _split_of(folder: ImageFolder) -> dict[str, str]:
    where = {p: "train" for p in folder.train.paths}
    where.update({p: "val" for p in folder.val.paths})
    where.update({p: "test" for p in folder.test.paths})
    return where


def _label_of(folder: ImageFolder) -> dict[str, str]:
    labels = {}
    for split in (folder.train, folder.val, folder.test):
        labels.update({p: folder.label_text(y) for p, y in zip(split.paths, split.labels)})
    return labels


def _duplicates(folder: ImageFolder) -> list[Finding]:
    split_of, label_of = _split_of(folder), _label_of(folder)
    groups: dict[str, list[str]] = defaultdict(list)
    for path in split_of:
        groups[folder.probes[path].sha256].append(path)
    findings = []
    for paths in (g for g in groups.values() if len(g) > 1):
        labels = {label_of[p] if not folder.multi_label else f"'{label_of[p]}'"
                  for p in paths}
        splits = {split_of[p] for p in paths}
        if len(labels) > 1:
            findings.append(Finding(WARNING, "conflicting_labels",
                                    f"the same image is labelled {', '.join(sorted(labels))}",
                                    paths))
        if len(splits) > 1:
            held = sorted(splits - {"train"})
            verb = "overstates" if len(held) == 1 else "overstate"
            findings.append(Finding(WARNING, "leak",
                                    f"exact duplicate across {' and '.join(sorted(splits))}: "
                                    f"{' and '.join(held)} {verb} accuracy", paths))
        else:
            findings.append(Finding(WARNING, "duplicate",
                                    f"exact duplicate inside {splits.pop()}", paths))
    return findings


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def _hashable(folder: ImageFolder, paths: list[str]) -> list[str]:
    """Images large enough for their difference hash to tell them apart.

    The hash samples a 17x16 grid: an 8x8 scan upscaled to it says little, and such images
    (scikit-learn's digits) came out as "near-duplicates" of other digits.
    """
    return [p for p in paths
            if min(folder.probes[p].width, folder.probes[p].height) >= defaults.TINY_SIDE]


def _correlations(thumbs: np.ndarray, one: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``thumbs`` with ``one`` (grayscale thumbnails); two
    flat images correlate 1 when their levels are close, else 0."""
    a = thumbs.astype(np.float32)
    b = one.astype(np.float32)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean()
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b)
    corr = (a @ b) / np.maximum(na * nb, 1e-6)
    level = np.abs(thumbs.astype(np.float32).mean(axis=1) - one.astype(np.float32).mean()) < 8
    both_flat = (na < 1e-3) & (nb < 1e-3) & level
    return np.where((na < 1e-3) | (nb < 1e-3), both_flat.astype(np.float32), corr)


def hash_only(distance: np.ndarray, correlation: np.ndarray) -> np.ndarray:
    """The difference hash alone (benchmarks/near_copies.py compares it)."""
    return distance <= defaults.NEAR_DUPLICATE_BITS


def near_copy_rule(distance: np.ndarray, correlation: np.ndarray) -> np.ndarray:
    """A hash match confirmed by the thumbnails' correlation: line drawings on white hash
    alike (flat paper gives the same bits), their thumbnails do not correlate."""
    return (distance <= defaults.NEAR_DUPLICATE_BITS) & \
        (correlation >= defaults.NEAR_DUPLICATE_CORRELATION)


def _near_duplicates(folder: ImageFolder) -> list[Finding]:
    """One finding per validation image that nearly copies training images (one per kind:
    copies with its label, and copies with another label, a likely label error)."""
    train, val = _hashable(folder, folder.train.paths), _hashable(folder, folder.val.paths)
    if not train or not val:
        return []
    label_of = _label_of(folder)
    t = np.frombuffer(b"".join(folder.probes[p].dhash for p in train), np.uint8)
    t = t.reshape(len(train), -1)
    thumbs = np.frombuffer(b"".join(folder.probes[p].thumb for p in train), np.uint8)
    thumbs = thumbs.reshape(len(train), -1)
    bits = t.shape[1] * 8
    t_sha = [folder.probes[p].sha256 for p in train]
    findings = []
    for v_path in val:
        probe = folder.probes[v_path]
        distance = _POPCOUNT[t ^ np.frombuffer(probe.dhash, np.uint8)].sum(axis=1)
        candidates = np.flatnonzero(distance <= defaults.NEAR_DUPLICATE_BITS)
        if not len(candidates):
            continue
        v_thumb = np.frombuffer(probe.thumb, np.uint8)
        correlation = _correlations(thumbs[candidates], v_thumb)
        near = candidates[near_copy_rule(distance[candidates], correlation)]
        near = [i for i in near if t_sha[i] != probe.sha256]  # exact copies: reported as leaks
        for same in (False, True):
            matches = sorted((i for i in near if (label_of[train[i]] == label_of[v_path]) == same),
                             key=lambda i: distance[i])
            if not matches:
                continue
            closest = f"closest {int(distance[matches[0]])}/{bits} bits differ"
            more = f" and {len(matches) - 1} more" if len(matches) > 1 else ""
            if same:
                findings.append(Finding(WARNING, "near_duplicate",
                                        f"val image nearly identical to a train image{more} "
                                        f"({closest})", [v_path, *(train[i] for i in matches)]))
            else:
                findings.append(Finding(
                    WARNING, "near_duplicate_labels",
                    f"val image labelled {label_of[v_path]} nearly identical to a train image "
                    f"labelled {label_of[train[matches[0]]]}{more} ({closest}): a likely label "
                    "error", [v_path, *(train[i] for i in matches)]))
    return findings


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _shapes(folder: ImageFolder) -> list[Finding]:
    tiny, extreme = [], []
    for path in _split_of(folder):
        probe = folder.probes[path]
        if min(probe.width, probe.height) < defaults.TINY_SIDE:
            tiny.append(path)
        elif max(probe.width, probe.height) / min(probe.width, probe.height) > defaults.MAX_ASPECT:
            extreme.append(path)
    findings = []
    if tiny:
        findings.append(Finding(WARNING, "tiny",
                                f"{_images(len(tiny))} under {defaults.TINY_SIDE} px on a side: "
                                "they are upscaled to the training size (little detail for a "
                                "pretrained base) and too small for the near-duplicate check",
                                tiny))
    if extreme:
        findings.append(Finding(WARNING, "aspect_ratio",
                                f"{_images(len(extreme))} more than {defaults.MAX_ASPECT:g}:1, "
                                "squashed to a square in training", extreme))
    return findings


def _imbalance(counts: dict[str, dict[str, int]]) -> list[Finding]:
    train = {c: n["train"] for c, n in counts.items() if n["train"]}
    if len(train) < 2:
        return []
    big, small = max(train, key=train.__getitem__), min(train, key=train.__getitem__)
    ratio = train[big] / train[small]
    if ratio <= defaults.IMBALANCE_RATIO:
        return []
    return [Finding(WARNING, "imbalance",
                    f"class imbalance: {big} has {train[big]} training images, {small} "
                    f"{train[small]} ({ratio:.1f}x); graft fit weights classes by default")]


def _label_sets(folder: ImageFolder, counts: dict[str, dict[str, int]]) -> list[Finding]:
    """Multi-label data: how many labels per image, labels too rare to learn or to score,
    labels that never occur apart."""
    sizes = [len(y) for y in folder.train.labels]
    findings = []
    if sizes:
        empty = sum(n == 0 for n in sizes)
        findings.append(Finding(NOTE, "label_cardinality",
                                f"{np.mean(sizes):.2f} labels per training image "
                                f"({min(sizes)}-{max(sizes)})"
                                + (f"; {_images(empty)} with none of the labels" if empty
                                   else "")))
    for label, n in counts.items():
        if 0 < n["train"] < defaults.MIN_LABEL_POSITIVES:
            findings.append(Finding(WARNING, "rare_label",
                                    f"{label}: {_images(n['train'])} in training, too few to "
                                    f"learn it well (aim for {defaults.MIN_LABEL_POSITIVES}+)"))
        if n["val"] == 0:
            findings.append(Finding(WARNING, "label_not_in_val",
                                    f"{label}: no validation image has it, so it cannot be "
                                    "scored and its threshold stays at 0.5"))
        elif n["val"] < defaults.MIN_THRESHOLD_POSITIVES:
            findings.append(Finding(WARNING, "label_rare_in_val",
                                    f"{label}: {_images(n['val'])} in validation, too few to "
                                    "choose its threshold (it stays at 0.5) or score it "
                                    "reliably"))
    together: dict[frozenset, list[str]] = defaultdict(list)
    for j, label in enumerate(folder.classes):
        rows = frozenset(i for i, y in enumerate(folder.train.labels) if j in y)
        if rows:
            together[rows].append(label)
    for labels in (ls for ls in together.values() if len(ls) > 1):
        findings.append(Finding(WARNING, "labels_together",
                                f"{' and '.join(labels)} are on exactly the same training "
                                "images: the model cannot tell them apart"))
    return findings


def _skipped(folder: ImageFolder) -> list[Finding]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for item in folder.skipped:
        reason = item["reason"]
        kind = ("hidden" if reason.startswith("hidden") else
                "non_image" if reason.startswith("not an image") else "unreadable")
        by_kind[kind].append(item)
    findings = []
    for item in by_kind["unreadable"]:
        findings.append(Finding(WARNING, "unreadable", item["reason"], [item["path"]]))
    if by_kind["non_image"]:
        exts = Counter(i["reason"] for i in by_kind["non_image"])
        findings.append(Finding(WARNING, "non_image",
                                f"{len(by_kind['non_image'])} files that are not images: "
                                + ", ".join(f"{n} {r.split('(')[-1].rstrip(')')}"
                                            for r, n in exts.most_common()),
                                [i["path"] for i in by_kind["non_image"]]))
    if by_kind["hidden"]:
        findings.append(Finding(NOTE, "hidden",
                                f"{len(by_kind['hidden'])} hidden files or folders ignored",
                                [i["path"] for i in by_kind["hidden"]]))
    return findings


def find_problems(folder: ImageFolder) -> CheckReport:
    """Findings for a scanned folder (``graftkit.data.scan``)."""
    splits = [("train", folder.train), ("val", folder.val)]
    if folder.test_source:
        splits.append(("test", folder.test))
    counts = {c: {name: 0 for name, _ in splits} for c in folder.classes}
    for name, split in splits:
        for y in split.labels:
            for label in (y if folder.multi_label else (y,)):  # a label set counts each label
                counts[folder.classes[label]][name] += 1
    findings = [Finding(FATAL, "fatal", message) for message in folder.fatal]
    findings += _skipped(folder) + _duplicates(folder) + _near_duplicates(folder)
    findings += _shapes(folder)
    findings += _label_sets(folder, counts) if folder.multi_label else _imbalance(counts)
    order = {FATAL: 0, WARNING: 1, NOTE: 2}
    findings.sort(key=lambda f: order[f.severity])
    return CheckReport(str(folder.root), folder.split_source, counts, findings)


def check(data_dir: str | os.PathLike, val_split: float = defaults.VAL_SPLIT,
          seed: int = defaults.SEED, val: str | os.PathLike | None = None,
          test: str | os.PathLike | None = None, multi_label: bool = False,
          label_sep: str = " ") -> CheckReport:
    """Look for what would spoil training on a data folder, without training.

    Finds unreadable or skipped files, exact and near duplicates (also across the split and
    across classes), odd image shapes and class imbalance. A fatal problem (e.g. a class with
    no images) is a finding, not an exception, so every problem is reported at once.

    Args:
        data_dir: the folder (or CSV/TSV table) ``graft fit`` would read.
        val_split: the validation share when the data has no ``val/`` folder.
            Defaults to 0.2.
        seed: the seed of that split. Defaults to 1337.
        val: a separate validation folder or table. Defaults to None.
        test: a held-out test folder or table (default: ``test/`` beside ``train/``).
            Defaults to None.
        multi_label: read a ``path,label`` table's cells as sets of labels (a ``path,labels``
            table is multi-label anyway). Defaults to False.
        label_sep: the separator of those labels. Defaults to " ".

    Returns:
        A ``CheckReport``: ``findings`` (each with ``severity``, ``kind``, ``message``,
        ``paths``), ``counts`` per split and class, ``status`` and ``exit_code`` (0 clean, 1 warnings, 2 fatal).

    Example:
        >>> report = graftkit.check("photos/")  # doctest: +SKIP
        >>> [f.message for f in report.findings]  # doctest: +SKIP
    """
    return find_problems(scan(data_dir, val_split, seed, strict=False, val=val, test=test,
                              multi_label=multi_label, label_sep=label_sep))

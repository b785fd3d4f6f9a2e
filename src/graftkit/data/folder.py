"""A folder (or a .csv/.tsv table) of labelled images in, a seeded train/validation split out.

Every file is decoded once while scanning, so an unreadable image is reported up front (in
``skipped``) instead of killing a training run half-way.
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from graftkit import defaults
from graftkit.data.images import ImageProbe, probe_image, read_bytes
from graftkit.defaults import IMAGE_EXTENSIONS, TEST_DIR_NAME, TRAIN_DIR_NAME, VAL_DIR_NAMES
from graftkit.errors import DataError, UsageError

if TYPE_CHECKING:
    from graftkit.progress import ProgressFactory


@dataclass
class Split:
    """One split: parallel lists of file paths and labels (a class index, or for multi-label
    data a sorted tuple of label indices)."""

    paths: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)



@dataclass
class ImageFolder:
    """A scanned dataset: class names in label order, the splits, and what was skipped.

    ``test`` is empty unless the data has a ``test/`` folder or ``--test`` names one: images
    scored once at the end, with nothing chosen on them (validation images choose the best
    epoch, the mode, the temperature and the open-set threshold)."""

    root: Path
    classes: list[str]
    train: Split
    val: Split
    skipped: list[dict[str, str]]
    split_source: str  # "folders" (train/ and val/ given) or "seeded split of N%"
    probes: dict[str, ImageProbe] = field(default_factory=dict)
    fatal: list[str] = field(default_factory=list)  # filled instead of raising when not strict
    test: Split = field(default_factory=Split)
    test_source: str | None = None  # where the test images came from; None: no test set
    multi_label: bool = False  # labels are sets of indices into ``classes`` (the label names)

    def label_text(self, label) -> str:
        """A label as written in split.json and tables: the class, or the names joined by
        spaces."""
        if self.multi_label:
            return " ".join(self.classes[i] for i in label)
        return self.classes[label]

    def digests(self, split: Split) -> list[str]:
        """Content digests of a split's files (what caches key on), from the scan."""
        out = []
        for path in split.paths:
            probe = self.probes.get(path)
            out.append(probe.sha256 if probe and probe.sha256
                       else hashlib.sha256(read_bytes(path)).hexdigest())
        return out



def _is_hidden(name: str) -> bool:
    return name.startswith(".")



def _check_class_name(name: str, where: Path) -> None:
    """Class names end up in file names of reports and exports: keep them plain."""
    if name in (".", "..") or any(c in name for c in "/\\\0") or not name.isprintable():
        raise DataError(f"class folder name {name!r} in {where} is not usable: rename it")



def _list_files(class_dir: Path, skipped: list[dict[str, str]]) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        for name in [d for d in dirnames if _is_hidden(d)]:
            skipped.append({"path": str(Path(dirpath) / name), "reason": "hidden folder"})
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            target = files if not _is_hidden(name) else None
            if target is None:
                skipped.append({"path": str(Path(dirpath) / name), "reason": "hidden file"})
            else:
                target.append(Path(dirpath) / name)
    return files



def _class_dirs(folder: Path, skipped: list[dict[str, str]]) -> list[Path]:
    dirs = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        if _is_hidden(p.name):
            skipped.append({"path": str(p), "reason": "hidden folder"})
            continue
        _check_class_name(p.name, folder)
        dirs.append(p)
    return dirs



def probe_candidates(candidates: dict[str, list[str]], skipped: list[dict[str, str]],
                      probes: dict[str, ImageProbe] | None,
                      bars: ProgressFactory | None = None) -> dict[str, list[str]]:
    """Decode every candidate once (in threads); keep the readable ones.

    ``bars(label, total)`` may return a ``graftkit.progress.Progress`` to report to.
    """
    all_paths = [p for ps in candidates.values() for p in ps]
    bar = bars("scanning images", len(all_paths)) if bars else None
    found = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        for path, probe in zip(all_paths, pool.map(probe_image, all_paths)):
            found[path] = probe
            if bar is not None:
                bar.update(len(found))
    if bar is not None:
        bar.close()
    if probes is not None:
        probes.update(found)
    result = {}
    for name, paths in candidates.items():
        for p in paths:
            reason = found[p].reason
            if reason:
                skipped.append({"path": p, "reason": reason})
        result[name] = [p for p in paths if not found[p].reason]
    return result



def scan_classes(folder: Path, skipped: list[dict[str, str]],
                 probes: dict[str, ImageProbe] | None = None,
                 bars: ProgressFactory | None = None) -> dict[str, list[str]]:
    """``{class: [readable image paths]}``; everything else goes to ``skipped`` with a reason."""
    if folder.is_file():
        return scan_table(folder, skipped, probes, bars)
    candidates: dict[str, list[str]] = {}
    for class_dir in _class_dirs(folder, skipped):
        paths = []
        for f in _list_files(class_dir, skipped):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                ext = f.suffix or "no extension"
                skipped.append({"path": str(f), "reason": f"not an image file ({ext})"})
            else:
                paths.append(str(f))
        candidates[class_dir.name] = paths
    return probe_candidates(candidates, skipped, probes, bars)



def scan_table(table: Path, skipped: list[dict[str, str]],
               probes: dict[str, ImageProbe] | None = None,
               bars: ProgressFactory | None = None) -> dict[str, list[str]]:
    """A CSV or TSV of ``path,label`` rows (a header row is optional; paths relative to it)."""
    delimiter = table_delimiter(table)
    rows = table_rows(table)
    if table_header(rows) == ["path", "label"]:
        rows = rows[1:]
    candidates: dict[str, list[str]] = {}
    for n, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{table} row {n}: expected 'path{delimiter}label', got {row!r}")
        path, label = row[0].strip(), row[1].strip()
        _check_class_name(label, table)
        full = table_image(table, path, skipped)
        if full is not None:
            candidates.setdefault(label, []).append(full)
    return probe_candidates(dict(sorted(candidates.items())), skipped, probes, bars)


def table_delimiter(table: Path) -> str:
    """A tab for a .tsv file, else a comma."""
    return "\t" if table.suffix.lower() == ".tsv" else ","


def table_rows(table: Path) -> list[list[str]]:
    """The non-empty rows of a CSV (or, by its suffix, TSV) file; one error if unreadable."""
    import csv

    delimiter = table_delimiter(table)
    try:
        with open(table, encoding="utf-8-sig", newline="") as f:
            return [r for r in csv.reader(f, delimiter=delimiter) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {table}: {exc}") from None


def table_header(rows: list[list[str]]) -> list[str]:
    """The first two cells of the first row, as a header would name them."""
    return [c.strip().lower() for c in rows[0][:2]] if rows else []


def table_image(table: Path, path: str, skipped: list[dict[str, str]] | None) -> str | None:
    """A table's path cell as an absolute path (relative to the table), or None for a file
    that is not an image (told in ``skipped``)."""
    full = Path(path) if os.path.isabs(path) else table.parent / path
    if full.suffix.lower() not in IMAGE_EXTENSIONS:
        if skipped is not None:
            skipped.append({"path": str(full), "reason": f"not an image file ({full.suffix})"})
        return None
    return str(full)



def require_classes(by_class: dict[str, list[str]], where: Path) -> None:
    if not by_class:
        raise DataError(
            f"{where} has no class subfolders: put the images of each class in {where}/<class>/"
        )
    empty = [c for c, ps in by_class.items() if not ps]
    if empty:
        raise DataError(
            f"class folder {where / empty[0]} has no readable image: add images or remove the folder"
        )
    if len(by_class) < 2:
        raise DataError(f"{where} has only one class ({next(iter(by_class))}): a classifier needs at least 2")



def _seeded_split(by_class: dict[str, list[str]], val_split: float, seed: int) -> tuple[Split, Split]:
    rng = random.Random(seed)
    train, val = Split(), Split()
    for label, name in enumerate(by_class):
        paths = list(by_class[name])
        rng.shuffle(paths)
        n_val = int(round(len(paths) * val_split))
        if len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        else:
            n_val = 0
        for i, p in enumerate(paths):
            target = val if i < n_val else train
            target.paths.append(p)
            target.labels.append(label)
    return train, val



def _as_split(by_class: dict[str, list[str]], classes: list[str]) -> Split:
    split = Split()
    for name, paths in by_class.items():
        split.paths.extend(paths)
        split.labels.extend([classes.index(name)] * len(paths))
    return split



def find_split_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(train, val)`` folders when ``root`` holds them, else None."""
    train = root / TRAIN_DIR_NAME
    for name in VAL_DIR_NAMES:
        if train.is_dir() and (root / name).is_dir():
            return train, root / name
    return None


def find_test_dir(root: Path) -> Path | None:
    """``root/test`` beside ``root/train``: held-out images (not a class named "test")."""
    test = root / TEST_DIR_NAME
    return test if (root / TRAIN_DIR_NAME).is_dir() and test.is_dir() else None



TABLE_SUFFIXES = (".csv", ".tsv")



def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))



def check_data_path(data: str | os.PathLike, what: str = "data folder") -> None:
    """A labelled data source exists and is of a kind graftkit reads (no TensorFlow needed)."""
    from graftkit.data.sources import is_tfds

    if is_tfds(data):
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_file() and path.suffix.lower() not in TABLE_SUFFIXES:
        kind = "an image" if path.suffix.lower() in IMAGE_EXTENSIONS else "a file"
        raise DataError(f"{path} is {kind}, not a {what}: pass a folder with one subfolder per "
                        "class, or a .csv/.tsv of path,label rows"
                        + (" (graft predict takes single images)" if kind == "an image" else ""))



def scan(data_dir: str | os.PathLike, val_split: float = defaults.VAL_SPLIT, seed: int = defaults.SEED,
         strict: bool = True, val: str | os.PathLike | None = None,
         bars: ProgressFactory | None = None, test: str | os.PathLike | None = None,
         multi_label: bool = False, label_sep: str = " ") -> ImageFolder:
    """Scan and check every image of a dataset.

    ``data_dir`` is a class folder, a folder with ``train/`` and ``val/`` class folders (and
    optionally ``test/``), a CSV/TSV of ``path,label`` rows, or ``tfds:NAME[:SPLIT]``. ``val``
    (a class folder, CSV or ``tfds:`` name) gives the validation set explicitly; without it and
    without ``val/``, a stratified seeded split is made. ``test`` (or a ``test/`` folder beside
    ``train/``) gives held-out images scored once at the end. With ``strict=False`` a fatal
    problem (fewer than two classes, a class without a readable image) is recorded in
    ``fatal`` instead of raised, for ``graft check`` to report.

    Several labels per image come as a table with a ``labels`` column (or any table with
    ``multi_label``), alone or as ``train.csv``/``val.csv``/``test.csv`` in a folder; label names
    are separated by ``label_sep``.
    """
    from graftkit.data.sources import is_tfds, materialise_tfds

    _check_sources(data_dir, val, test, val_split)
    # Absolute paths: the run folder's split, predictions and report work from any folder.
    root = materialise_tfds(str(data_dir)) if is_tfds(data_dir) else _absolute(data_dir)
    if val is not None:
        val = materialise_tfds(str(val)) if is_tfds(val) else _absolute(val)
    tables = label_set_tables(root, val, test, multi_label)
    if tables:
        return _scan_label_sets(root, tables, val_split, seed, strict, label_sep, bars)
    skipped: list[dict[str, str]] = []
    probes: dict[str, ImageProbe] = {}
    fatal: list[str] = []

    def fail(message: str) -> None:
        if strict:
            raise DataError(message)
        fatal.append(message)

    def require(by_class, where):
        try:
            require_classes(by_class, where)
        except DataError as exc:
            fail(str(exc))

    dirs = find_split_dirs(root) if root.is_dir() else None
    test_dir = find_test_dir(root) if root.is_dir() else None
    if test is not None:
        test = materialise_tfds(str(test)) if is_tfds(test) else _absolute(test)
    test_src = Path(test) if test is not None else test_dir
    # train/ and test/ without val/: train/ is split for validation, test/ held out
    train_src = dirs[0] if dirs else (root / TRAIN_DIR_NAME if test_dir else root)
    val_src = Path(val) if val is not None else (dirs[1] if dirs else None)
    train_by_class = scan_classes(train_src, skipped, probes, bars)
    require(train_by_class, train_src)
    classes = list(train_by_class)

    def held_out(src: Path, what: str) -> Split:
        by_class = scan_classes(src, skipped, probes, bars)
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            fail(f"{src} has classes missing from {train_src}: {', '.join(unknown)}; "
                 "use the same class names in both")
            by_class = {c: ps for c, ps in by_class.items() if c in classes}
        items = _as_split(by_class, classes)
        if len(items) == 0 and not fatal:
            fail(f"{src} has no readable image: add {what} images")
        return items

    if val_src is None:
        train, val_items = _seeded_split(train_by_class, val_split, seed)
        if len(val_items) == 0 and not fatal:
            fail(f"{root} has too few images for a validation split: add images")
        source = f"seeded split ({val_split:.0%} validation, seed {seed})"
    else:
        train, val_items = _as_split(train_by_class, classes), held_out(val_src, "validation")
        source = "folders" if dirs and val is None else f"validation from {val_src}"
    folder = ImageFolder(root, classes, train, val_items, skipped, source, probes, fatal)
    if test_src is not None:
        folder.test, folder.test_source = held_out(test_src, "test"), str(test_src)
    return folder


def _check_sources(data_dir, val, test, val_split: float) -> None:
    check_data_path(data_dir)
    if val is not None:
        check_data_path(val, "validation data")
    if test is not None:
        check_data_path(test, "test data")
    if not 0.0 < val_split < 1.0:
        raise UsageError(f"--val-split must be between 0 and 1 (got {val_split})")


def label_set_tables(root: Path, val, test, multi_label: bool) -> dict[str, Path]:
    """The tables of a multi-label data set (empty: the data is single-label)."""
    from graftkit.data.multilabel import is_label_set_table, split_tables

    if root.is_file():
        tables = {"train": root}
    elif root.is_dir() and not find_split_dirs(root):
        tables = split_tables(root)
    else:
        tables = {}
    if not tables or not (multi_label or is_label_set_table(tables["train"])):
        if multi_label:
            raise UsageError(f"{root}: multi-label data comes as a .csv/.tsv with a header "
                             "'path,labels' (label names separated by spaces): a folder of "
                             "class folders gives one label per image")
        return {}
    for name, given in (("val", val), ("test", test)):
        if given is not None:
            if not Path(given).is_file():
                raise UsageError(f"--{name} {given}: multi-label data needs a table there too "
                                 "(path,labels)")
            tables[name] = Path(given)
    return tables


def _scan_label_sets(root: Path, tables: dict[str, Path], val_split: float, seed: int,
                     strict: bool, sep: str, bars: ProgressFactory | None) -> ImageFolder:
    """``scan`` for label sets: label names are the union of the training table's."""
    from graftkit.data.multilabel import read_label_sets, seeded_split

    skipped: list[dict[str, str]] = []
    probes: dict[str, ImageProbe] = {}
    fatal: list[str] = []
    read = {name: read_label_sets(t, sep, skipped) for name, t in tables.items()}
    readable = probe_candidates({name: [p for p, _ in rows] for name, rows in read.items()},
                                 skipped, probes, bars)
    ok = {name: set(paths) for name, paths in readable.items()}
    read = {name: [(p, ls) for p, ls in rows if p in ok[name]] for name, rows in read.items()}
    classes = sorted({label for _, ls in read["train"] for label in ls})

    def fail(message: str) -> None:
        if strict:
            raise DataError(message)
        fatal.append(message)

    if len(classes) < 2:
        fail(f"{tables['train']} names {len(classes)} label(s): multi-label data needs at "
             "least 2 label names")

    def split_of(rows, where: Path) -> Split:
        unknown = sorted({label for _, ls in rows for label in ls} - set(classes))
        if unknown:
            fail(f"{where} has labels missing from {tables['train']}: {', '.join(unknown)}; "
                 "use the same label names in both")
        out = Split()
        for path, ls in rows:
            out.paths.append(path)
            out.labels.append(tuple(classes.index(x) for x in ls if x in classes))
        return out

    items = split_of(read["train"], tables["train"])
    if "val" in read:
        train, val = items, split_of(read["val"], tables["val"])
        source = "tables" if tables["val"].parent == tables["train"].parent else \
            f"validation from {tables['val']}"
    else:
        kept, held = seeded_split(list(zip(items.paths, items.labels)), val_split, seed)
        train = Split([p for p, _ in kept], [ls for _, ls in kept])
        val = Split([p for p, _ in held], [ls for _, ls in held])
        source = f"seeded split ({val_split:.0%} validation, seed {seed})"
    if not len(train) or not len(val):
        fail(f"{tables['train']} has too few readable images for training and validation")
    folder = ImageFolder(root, classes, train, val, skipped, source, probes, fatal,
                         multi_label=True)
    if "test" in read:
        folder.test, folder.test_source = split_of(read["test"], tables["test"]), str(
            tables["test"])
    return folder

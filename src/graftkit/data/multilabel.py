"""Several labels per image: a CSV/TSV whose label column is ``labels`` (names separated by
spaces, or ``--label-sep``). A folder tree cannot say it, so label sets always come as a table.

A table is multi-label when its header names the column ``labels`` (``path,labels``), or when
the run asks for it (``--multi-label``: then a ``path,label`` table's cells are read as sets).
"""

from __future__ import annotations

import random
from pathlib import Path

from graftkit.errors import DataError, UsageError

LABELS_COLUMN = "labels"
DEFAULT_SEP = " "
TABLE_NAMES = ("train", "val", "test")  # a folder of tables: train.csv, val.csv, test.csv


def is_label_set_table(table: Path) -> bool:
    """The header says ``path,labels``: one row per image, a set of label names in the cell."""
    from graftkit.data.folder import table_header, table_rows

    return table_header(table_rows(table)) == ["path", LABELS_COLUMN]


def split_tables(root: Path) -> dict[str, Path]:
    """``{"train": .., "val": .., "test": ..}`` of the tables in ``root`` (train required)."""
    found = {}
    for name in TABLE_NAMES:
        for suffix in (".csv", ".tsv"):
            if (root / f"{name}{suffix}").is_file():
                found[name] = root / f"{name}{suffix}"
                break
    return found if "train" in found else {}


def read_label_sets(table: Path, sep: str = DEFAULT_SEP,
                    skipped: list[dict[str, str]] | None = None) -> list[tuple[str, list[str]]]:
    """``[(absolute image path, [label names])]`` of a table, in its row order.

    A row with an empty label cell is an image with none of the labels (kept: it teaches
    every label's "no"). Files that are not images go to ``skipped``."""
    from graftkit.data.folder import _check_class_name, table_header, table_image, table_rows

    if not sep:
        raise UsageError("--label-sep must be at least one character")
    rows = table_rows(table)
    if table_header(rows) in (["path", LABELS_COLUMN], ["path", "label"]):
        rows = rows[1:]
    out = []
    for n, row in enumerate(rows, start=1):
        if not row[0].strip():
            raise DataError(f"{table} row {n}: no path; expected 'path,labels' "
                            f"(label names separated by {sep!r})")
        path = row[0].strip()
        cell = row[1] if len(row) > 1 else ""
        names = sorted({name.strip() for name in cell.split(sep) if name.strip()})
        for name in names:
            _check_class_name(name, table)
            if any(c.isspace() for c in name):
                raise DataError(f"{table} row {n}: label {name!r} has a space; spaces separate "
                                "labels in graftkit's outputs (predictions.csv, split.json): "
                                f"write it as {'-'.join(name.split())!r}")
        full = table_image(table, path, skipped)
        if full is not None:
            out.append((full, names))
    return out


def read_labelled(data_dir, classes: list[str], sep: str = DEFAULT_SEP):
    """``(paths, label index sets, table, skipped, digests)`` of a table to evaluate a
    multi-label run on (a folder: its ``test.csv``, else its ``val.csv``)."""
    from graftkit.data.folder import check_data_path, probe_candidates

    check_data_path(data_dir)
    root = Path(data_dir)
    if root.is_dir():
        tables = split_tables(root)
        table = tables.get("test") or tables.get("val")
        if table is None:
            raise DataError(f"{root} has no test.csv or val.csv: this run has several labels "
                            "per image, so it is evaluated on a path,labels table")
    else:
        table = root
    skipped: list[dict[str, str]] = []
    probes: dict = {}
    rows = read_label_sets(table, sep, skipped)
    readable = set(probe_candidates({"all": [p for p, _ in rows]}, skipped, probes)["all"])
    rows = [(p, ls) for p, ls in rows if p in readable]
    if not rows:
        raise DataError(f"{table} has no readable image")
    unknown = sorted({x for _, ls in rows for x in ls} - set(classes))
    if unknown:
        raise DataError(f"{table} has labels the model was not trained on: {', '.join(unknown)}; "
                        f"the model knows {', '.join(classes)}")
    paths = [p for p, _ in rows]
    labels = [tuple(classes.index(x) for x in ls) for _, ls in rows]
    return paths, labels, table, skipped, [probes[p].sha256 for p in paths]


def seeded_split(items: list[tuple[str, tuple[int, ...]]], val_split: float,
                 seed: int) -> tuple[list, list]:
    """A seeded random split of (path, label set) items; at least one image each side."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_split))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return order[n_val:], order[:n_val]

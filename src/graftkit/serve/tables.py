"""Data kept in CSV/TSV tables, as the review edits it: the tables of a data set, which row of
which table holds each listed image, and the labels that row holds now (a table is read again
only when its file changed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from graftkit.serve.journal import JournalError, rel_path, within


def tables_of(source: str | None, options: dict, multi_label: bool) -> dict[str, Path]:
    """The tables the data's labels are kept in (split -> table); {} for class folders."""
    from graftkit.data.folder import label_set_tables
    from graftkit.errors import GraftError

    if not source:
        return {}
    path = Path(os.path.abspath(os.path.expanduser(source)))
    given = {name: options.get(name) for name in ("val", "test")}
    if multi_label:
        try:
            return label_set_tables(path, given["val"], given["test"], True)
        except GraftError:
            return {}
    if not path.is_file():
        return {}
    tables = {"train": path}
    for name, other in given.items():
        if other and Path(other).is_file():
            tables[name] = Path(os.path.abspath(other))
    return tables


class TableRows:
    """Where each listed image is written: key -> split -> ``(table, path cell)``, tables
    named relative to the data folder."""

    def __init__(self, folder: Path, tables: dict[str, Path], sep: str | None):
        self.folder, self.tables, self.sep = folder, tables, sep
        self.rows: dict[str, dict[str, tuple[str, str]]] = {}
        self._read: dict[str, tuple[tuple, dict[str, str]]] = {}

    def index(self, key_of: Callable[[str], str | None]) -> dict[str, dict[str, tuple[str, str]]]:
        """Every row of the tables under its image's key (``key_of``: an image path -> its
        key, None when it has none). Tables outside the data folder cannot be edited."""
        from graftkit.data.folder import table_image
        from graftkit.data.table_edit import row_cells
        from graftkit.errors import DataError

        rows: dict[str, dict[str, tuple[str, str]]] = {}
        for split, table in self.tables.items():
            where = rel_path(table, self.folder)
            if where is None or not within(table, self.folder):
                continue
            try:
                cells = row_cells(table)
            except DataError:
                continue
            for cell in cells:
                image = table_image(table, cell, None)
                key = key_of(image) if image else None
                if key is not None:
                    rows.setdefault(key, {}).setdefault(split, (where, cell))
        return rows

    def row(self, key: str, split: str) -> tuple[str, str]:
        """``(table, path cell)`` of an image: the table of its split (or its only one)."""
        where = self.rows.get(key)
        if not where:
            raise JournalError(f"{key} is in no table inside {self.folder}: edit its row by "
                               "hand", 409)
        return where.get(split) or next(iter(where.values()))

    def labels_now(self, key: str, split: str) -> list[str] | None:
        """The labels the table holds for an image now (None: not in an editable row)."""
        from graftkit.data.table_edit import cell_labels
        from graftkit.errors import DataError

        try:
            table, row = self.row(key, split)
            cell = self._cells(table).get(row)
        except (JournalError, DataError, OSError):
            return None
        return None if cell is None else cell_labels(cell, self.sep)

    def _cells(self, table: str) -> dict[str, str]:
        """A table's rows (path cell -> label cell), read again only when the file changed."""
        from graftkit.data.table_edit import row_cells

        path = self.folder / table
        st = os.stat(path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._read.get(table)
        if cached is None or cached[0] != stamp:
            cached = self._read[table] = (stamp, row_cells(path))
        return cached[1]

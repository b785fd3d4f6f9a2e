"""One image's labels changed in a CSV/TSV table, the rest of the file kept byte for byte.

The review page edits tables through the data folder's journal: a row's label cell is rewritten
and nothing else (other rows, their quoting, the header, line endings and a byte-order mark stay
as they were), and the new file replaces the old in one rename, so a crash leaves either the old
table or the new one, never half of each. The file keeps its permissions.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

from graftkit.data.folder import table_delimiter, table_header
from graftkit.data.multilabel import LABELS_COLUMN
from graftkit.errors import DataError

BOM = "\ufeff"


def _read(table: Path) -> tuple[str, list[str]]:
    """``(byte-order mark or "", lines with their endings)``."""
    try:
        text = table.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {table}: {exc}") from None
    bom = BOM if text.startswith(BOM) else ""
    return bom, text[len(bom):].splitlines(keepends=True)


def _records(table: Path, lines: list[str]):
    """``(first line, end line, fields)`` of each CSV record (a quoted cell may span lines)."""
    reader = csv.reader(iter(lines), delimiter=table_delimiter(table))
    start = 0
    for fields in reader:
        yield start, reader.line_num, fields
        start = reader.line_num


def _is_header(fields: list[str]) -> bool:
    return table_header([fields]) in (["path", "label"], ["path", LABELS_COLUMN])


def cell_labels(cell: str, sep: str | None) -> list[str]:
    """A label cell as sorted label names (``sep`` None: one label per image)."""
    if sep is None:
        return [cell.strip()] if cell.strip() else []
    return sorted({name.strip() for name in cell.split(sep) if name.strip()})


def row_cells(table: Path) -> dict[str, str]:
    """Each row's path cell (as written) -> its label cell."""
    _, lines = _read(table)
    return {fields[0].strip(): (fields[1] if len(fields) > 1 else "")
            for _, _, fields in _records(table, lines)
            if fields and fields[0].strip() and not _is_header(fields)}


def row_labels(table: Path, row: str, sep: str | None) -> list[str] | None:
    """The labels of the row whose path cell is ``row`` (None: no such row)."""
    cell = row_cells(table).get(row)
    return None if cell is None else cell_labels(cell, sep)


def set_row_labels(table: Path, row: str, labels: list[str], sep: str | None) -> None:
    """Rewrite the label cell of every row whose path cell is ``row``; atomically."""
    from graftkit.files import atomic_write, fsync_dir

    if sep is None and len(labels) != 1:
        raise DataError(f"{table}: one label per image, got {labels}")
    cell = labels[0] if sep is None else sep.join(sorted(labels))
    bom, lines = _read(table)
    found = False
    out: list[str] = []
    for start, end, fields in _records(table, lines):
        if not fields or fields[0].strip() != row or _is_header(fields):
            out.extend(lines[start:end])
            continue
        found = True
        ending = lines[end - 1][len(lines[end - 1].rstrip("\r\n")):]
        fields = [fields[0], cell, *fields[2:]]
        buf = io.StringIO()
        csv.writer(buf, delimiter=table_delimiter(table), lineterminator=ending).writerow(fields)
        out.append(buf.getvalue())
    if not found:
        raise DataError(f"{table} has no row for {row}: was it edited by hand meanwhile?")
    data = (bom + "".join(out)).encode("utf-8")
    real = Path(os.path.realpath(table))  # a table reached through a link stays a link
    mode = stat.S_IMODE(os.stat(real).st_mode)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)

    atomic_write(real, write)
    fsync_dir(real.parent)  # the rename durable


def leftover_temp_files(table: Path) -> list[Path]:
    """Temp files of ``set_row_labels`` a crash left beside ``table``."""
    real = Path(os.path.realpath(table))
    stem, suffix = real.name.split(".")[0], "".join(real.suffixes)
    return [p for p in real.parent.glob(f".{stem}-*{suffix}")
            if len(p.name) == len(stem) + 14 + len(suffix)]

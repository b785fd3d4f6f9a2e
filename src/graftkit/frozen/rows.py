"""Where frozen outputs live during a run: arrays in memory, or scratch files past a budget.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from graftkit import defaults

STORE_DTYPE = np.float16  # halves memory and disk; measured not to move accuracy



class DiskRows:
    """Rows of one shape in an unlinked scratch file, read and written with pread/pwrite.

    Stands in for an array too large for memory: ``rows[i] = row``, ``rows[indices]``, ``shape``,
    ``len``. Not a memory map: mapped pages count as the process's resident memory once touched,
    whereas reads into fresh buffers leave only the batch in it (the kernel's page cache keeps
    the file warm). The file has no name once open, so nothing is left behind, even on a kill.
    """

    def __init__(self, n: int, shape: tuple[int, ...], dtype=STORE_DTYPE,
                 folder: Path | None = None):
        folder = folder or defaults.cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self._fd, name = tempfile.mkstemp(prefix="rows-", suffix=".bin", dir=folder)
        os.unlink(name)
        self.shape, self.dtype = (n, *shape), np.dtype(dtype)
        self._row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        os.ftruncate(self._fd, n * self._row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        data = np.ascontiguousarray(row, dtype=self.dtype).tobytes()
        os.pwrite(self._fd, data, int(i) * self._row_bytes)

    def __getitem__(self, rows) -> np.ndarray:
        single = np.isscalar(rows)
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer
        size, j = self._row_bytes, 0
        while j < len(rows):  # one read per run of consecutive rows
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            got = os.preadv(self._fd, [view[j * size: k * size]], int(rows[j]) * size)
            if got != (k - j) * size:
                raise OSError(f"short read from the scratch file ({got} bytes)")
            j = k
        return out[0] if single else out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()



def rows_for(n: int, shapes: list[tuple[int, ...]], views: int, budget: int):
    """Per view, one array per output: in memory, or ``DiskRows`` when they pass ``budget``."""
    per_view = sum(int(np.prod(s, dtype=np.int64)) for s in shapes) * n
    spill = per_view * views * np.dtype(STORE_DTYPE).itemsize > budget
    make = DiskRows if spill else (lambda n, shape: np.empty((n, *shape), dtype=STORE_DTYPE))
    return [[make(n, shape) for shape in shapes] for _ in range(views)]

"""What the measurement scripts share: progress on stderr, one JSON line per result (with the
commit and the CPU flags beside it), and a mean ± spread for their tables."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from defaults import source_commit
from serve import cpu_flags


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def append(results: Path, row: dict) -> None:
    """``row`` as one more line of ``results``, stamped with the commit, CPU flags and time."""
    row = {**row, "commit": source_commit(), "cpu_flags": cpu_flags(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def mean_sd(values, digits: int = 3) -> str:
    """``mean ± population sd`` of the values given (None left out); one value as it is."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"

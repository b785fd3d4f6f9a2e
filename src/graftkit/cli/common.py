"""What every command shares: its one record, tables, verbosity, the --unsafe flag."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``graft`` command, declared in one place: the parser, the checks and the work.

    ``preflight`` checks paths and values without TensorFlow, so a typo is answered at once;
    TensorFlow is imported after it only for commands with ``tensorflow=True``.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    preflight: Callable[[argparse.Namespace], None] | None = None
    tensorflow: bool = False
    examples: str = ""

    def add_to(self, subs) -> argparse.ArgumentParser:
        p = subs.add_parser(
            self.name, help=self.help, description=self.help,
            allow_abbrev=False,  # --head-epoch is a typo, not --head-epochs
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(self.examples).strip(), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.arguments(p)
        return p


def table(rows: list[list], header: list[str]) -> str:
    """Columns padded to their widest cell, under a header and a rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def verbose() -> int:
    """Keras' verbosity: progress bars on a terminal, one line per epoch in a log."""
    return 1 if sys.stdout.isatty() else 2


def add_unsafe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unsafe", action="store_true",
                   help="allow model files that contain code (Lambda layers): trusted files only")

"""``graft``: a thin command line over the library; every command is a library call.

Each command is one ``Command`` record (``graftkit.cli.common``) beside its code: ``training``
(fit, refit, lr-find, demo), ``data`` (check, suggest, review), ``runs`` (predict, evaluate, report, export,
serve) and ``models`` (inspect, backbones, cache). User errors (``GraftError``) end in one line
on stderr and a documented exit code; see ``graftkit.errors.EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import os
import sys

from graftkit.cli import data, models, runs, training
from graftkit.cli.common import Command
from graftkit.errors import EXIT_CODES, DiskFullError, GraftError
from graftkit.quiet import import_tensorflow

_BY_NAME = {c.name: c for c in (*training.COMMANDS, *data.COMMANDS, *runs.COMMANDS,
                                *models.COMMANDS)}
# The order of graft --help.
ORDER = ("fit", "refit", "lr-find", "check", "predict", "suggest", "evaluate", "inspect", "report",
         "export", "serve", "review", "backbones", "cache", "demo")
COMMANDS: tuple[Command, ...] = tuple(_BY_NAME[name] for name in ORDER)
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft", allow_abbrev=False,
        description="Transfer learning and fine-tuning of pretrained image models, done right.",
        epilog="exit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from graftkit import __version__

    parser.add_argument("--version", action="version", version=f"graftkit {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(subs)
    return parser


def _run(args) -> int:
    import warnings

    # graftkit refuses images over its pixel limits itself, with a message naming the file;
    # Pillow's warning about the same images would reach the console (a server's log) as noise.
    warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb")
    command = _BY_NAME[args.command]
    if command.preflight is not None:
        command.preflight(args)
    if command.tensorflow:
        import_tensorflow()
    return command.run(args)


def main(argv: list[str] | None = None) -> int:
    """The ``graft`` command. Every user error ends in one line on stderr and an exit code."""
    name = "graft"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        name = f"graft {args.command}"
        from graftkit.frozen import runtimes

        runtimes.forced_engine()  # a typo in the engine settings stops before any work
        runtimes.wanted_precision()
        return _run(args)
    except GraftError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = (" (run the same command again to resume: fine-tuning goes on from its last"
                " finished epoch; phase 1 on cached features reruns in seconds)"
                if name in ("graft fit", "graft refit", "graft demo") else "")
        print(f"{name}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `graft predict ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        from graftkit.files import is_disk_full

        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{name}: error: no space left on the disk{where}: free some space, then run the "
              "same command again", file=sys.stderr)
        return DiskFullError.exit_code


if __name__ == "__main__":
    sys.exit(main())

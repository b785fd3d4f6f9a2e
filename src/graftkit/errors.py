"""User-facing errors: each says what went wrong and what to do, and maps to an exit code.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; anything that is
not a ``GraftError`` is a bug in graftkit and keeps its traceback.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 1


class UsageError(GraftError):
    """A bad option value or combination."""

    exit_code = 2


class DataError(GraftError):
    """The image folder cannot be used: missing, too few classes, no readable image..."""

    exit_code = 3


class BackboneError(GraftError):
    """Unknown backbone, missing or unreadable weights, or a model file that cannot be a base."""

    exit_code = 4


class RunError(GraftError):
    """The run folder cannot be written, or is not a graftkit run."""

    exit_code = 5


class DiskFullError(RunError):
    """A write failed for want of space; what was written before it is intact."""

    def __init__(self, folder):
        self.folder = folder
        super().__init__(f"no space left on the disk of {folder}: free some space there (or "
                         "choose another folder), then run the same command again")


class ExportError(GraftError):
    """An exported model that does not reproduce the Keras model, or cannot be checked."""

    exit_code = 6


class ClusterError(GraftError):
    """A worker of a multi-worker run stopped or cannot be reached."""

    exit_code = 7


EXIT_CODES = {
    0: "success",
    1: "unexpected error (a bug in graftkit: please report it with its traceback)",
    2: "bad command-line usage or option value",
    3: "data problem (folder, classes, images)",
    4: "backbone or weights problem",
    5: "run folder problem (cannot write, not a run, would overwrite)",
    6: "export problem (the exported model disagrees with the Keras model)",
    7: "a worker of a multi-worker run stopped or cannot be reached (resume: same command)",
    130: "interrupted (Ctrl-C); graft fit resumes when the same command runs again",
}

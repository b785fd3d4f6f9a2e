"""Silence TensorFlow's C++ chatter, which bypasses every Python log setting.

Its start-up notes (oneDNN, CPU features), the TFLite converter's log and the XNNPACK delegate's
"INFO" line are written by C++ straight to file descriptors 1 and 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys


@contextlib.contextmanager
def silenced(fds: tuple[int, ...] = (1, 2)):
    """Send ``fds`` (and Python's own streams among them) to the null device for a moment."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        with contextlib.ExitStack() as stack:
            if 1 in fds:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if 2 in fds:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
        for fd in (*saved, devnull):
            os.close(fd)


def import_tensorflow() -> None:
    """Import TensorFlow once, without its start-up notes on the terminal."""
    if "tensorflow" in sys.modules:
        return
    with silenced((2,)):
        import tensorflow  # noqa: F401

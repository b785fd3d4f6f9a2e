"""The review page's "Refit now": ``graft refit`` in a child process, its log, its end.

A child process, not a thread: training takes the cores and TensorFlow's memory for minutes,
and the server must keep answering meanwhile (and a crash of the fit must not take it down).
When the child ends well, the server loads the new run and serves it (``Service.swap``).
Ctrl-C on the server reaches the child too (same process group); the fit resumes when run
again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

LOG_LINES = 200  # the last lines of the child's output kept
HEAD_LINES, TAIL_LINES = 12, 30  # what the page shows: the first lines, then the latest


class Refit:
    """One ``graft refit`` child: ``state`` is running, done or failed."""

    def __init__(self, run_dir: Path, data: str, out: Path,
                 when_done: Callable[[Path], str] | None = None):
        self.run_dir, self.data, self.out = run_dir, data, out
        self.command = [sys.executable, "-m", "graftkit.cli", "refit", str(run_dir), "--data",
                        data, "--out", str(out)]
        self.head: list[str] = []  # the first lines say what changed since the run
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.state, self.message = "running", ""
        self.when_done = when_done
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._thread = threading.Thread(target=self._follow, name="graft-refit", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.rstrip("\n").split("\r")[-1]
            if len(self.head) < HEAD_LINES:
                self.head.append(text)
            else:
                self.lines.append(text)
        code = self.proc.wait()
        if code != 0:
            self.state = "failed"
            last = next((ln for ln in reversed([*self.head, *self.lines]) if ln.strip()), "")
            self.message = f"graft refit ended with exit code {code}: {last}"
            return
        try:
            self.message = self.when_done(self.out) if self.when_done else ""
            self.state = "done"
        except Exception as exc:  # noqa: BLE001 - said on the page; the old run stays served
            self.state, self.message = "failed", f"the new run could not be served: {exc}"

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def status(self) -> dict:
        import shlex

        return {"state": self.state, "message": self.message, "out": str(self.out),
                "command": shlex.join(["graft", *self.command[3:]]),
                "log": self.head + (["..."] if len(self.lines) > TAIL_LINES else [])
                + list(self.lines)[-TAIL_LINES:]}

"""Dynamic batching that is fair: requests that arrive together share model calls, and a large
request cannot hold the model while small ones wait.

One worker thread owns the model (TFLite interpreters and traced functions are not meant to be
shared between threads). It waits up to ``max_wait`` seconds for requests to gather, then fills
a call of at most ``max_batch`` images round-robin: every waiting request gets an equal share
first, then the room left goes to those with more rows. A request of 1,000 images thus goes
through in slices, and a one-image request that arrives meanwhile is in the very next call: it
waits for at most one model call, not for the large request. Under load the calls are full and
the server runs at ``predict``'s batch throughput; a lone request waits at most ``max_wait``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
STUCK_AFTER = 60.0  # s one model call may run before /healthz calls the server stuck


@dataclass(eq=False)  # jobs are compared by identity (list.remove), never by their arrays
class _Job:
    pixels: np.ndarray
    future: Future
    submitted: float
    done: int = 0  # rows scored so far
    probs: list[np.ndarray] = field(default_factory=list)
    ood: list[np.ndarray] = field(default_factory=list)

    @property
    def left(self) -> int:
        return len(self.pixels) - self.done


class Batcher:
    """``submit(pixels)`` -> a ``Future`` of ``(probabilities, ood_scores)`` for those rows.

    Args:
        score: the model call, pixels -> (probabilities, open-set scores or None).
        max_batch: the most images in one model call. Defaults to 32.
        max_wait: seconds a call waits for more requests to share it. Defaults to 0.005.
        stuck_after: seconds one model call may run before ``health`` reports the server
            stuck. Defaults to ``STUCK_AFTER``.
    """

    def __init__(self, score: Scorer, max_batch: int = 32, max_wait: float = 0.005,
                 stuck_after: float = STUCK_AFTER):
        self.score, self.max_batch, self.max_wait = score, max_batch, max_wait
        self.stuck_after = stuck_after
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._call_started: float | None = None
        self.batches = 0  # model calls made, and the images they held: what /info reports
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="graft-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        future: Future = Future()
        if len(pixels) == 0:
            future.set_result((np.zeros((0, 0), np.float32), None))
            return future
        with self._cond:
            self._jobs.append(_Job(pixels, future, time.monotonic()))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Answer what is waiting, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def health(self) -> dict:
        """The queue as ``/healthz`` reports it; ``stuck`` when a model call has run too long
        or the worker is gone."""
        now = time.monotonic()
        with self._cond:
            waiting = sum(j.left for j in self._jobs)
            oldest = min((j.submitted for j in self._jobs), default=None)
            started = self._call_started
        busy = 0.0 if started is None else now - started
        stuck = busy > self.stuck_after or not self._thread.is_alive()
        return {"status": "stuck" if stuck else "ok", "waiting_images": waiting,
                "waiting_requests": len(self._jobs),
                "oldest_wait_s": round(0.0 if oldest is None else now - oldest, 3),
                "model_call_s": round(busy, 3)}

    def _take(self) -> list[tuple[_Job, int, int]]:
        """The next call's rows: ``(job, start, end)`` slices, round-robin (under the lock)."""
        room = self.max_batch
        shares: dict[int, int] = {}  # id(job) -> rows it gets in this call
        while room > 0:
            hungry = [j for j in self._jobs if j.left > shares.get(id(j), 0)]
            if not hungry:
                break
            quantum = max(1, room // len(hungry))
            for job in hungry:
                n = min(quantum, job.left - shares.get(id(job), 0), room)
                shares[id(job)] = shares.get(id(job), 0) + n
                room -= n
                if room == 0:
                    break
        return [(j, j.done, j.done + shares[id(j)]) for j in self._jobs if shares.get(id(j))]

    def _wait_for_work(self) -> bool:
        """Block until there are rows to score (False: closing and nothing left)."""
        with self._cond:
            while not self._jobs and not self._closing:
                self._cond.wait()
            if not self._jobs:
                return False
            deadline = time.monotonic() + self.max_wait
            while sum(j.left for j in self._jobs) < self.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return True

    def _loop(self) -> None:
        while self._wait_for_work():
            with self._cond:
                slices = self._take()
                self._call_started = time.monotonic()
            try:
                probs, ood = self.score(np.concatenate([j.pixels[a:b] for j, a, b in slices]))
            except Exception as exc:  # noqa: BLE001 - every request in the call gets the error
                with self._cond:
                    self._call_started = None
                    for job, _, _ in slices:
                        self._jobs.remove(job)
                for job, _, _ in slices:
                    job.future.set_exception(exc)
                continue
            finished, row = [], 0
            with self._cond:
                self._call_started = None
                self.batches += 1
                for job, a, b in slices:
                    n = b - a
                    job.probs.append(probs[row:row + n])
                    if ood is not None:
                        job.ood.append(ood[row:row + n])
                    job.done, row = b, row + n
                    if job.left == 0:
                        self._jobs.remove(job)
                        finished.append(job)
                self.images += row
            for job in finished:
                job.future.set_result((np.concatenate(job.probs),
                                       np.concatenate(job.ood) if job.ood else None))

"""Dynamic batching: uploads that arrive together go through the model in one call.

One worker thread owns the model (TFLite interpreters and traced functions are not meant to be
shared between threads). It takes the first waiting request, then whatever else arrives within
``max_wait`` seconds, up to ``max_batch`` images, and answers each request with its own rows.
Under load a batch fills at once and the server runs at ``predict``'s batch throughput; a lone
request waits at most ``max_wait``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class Batcher:
    """``submit(pixels)`` -> a ``Future`` of ``(probabilities, ood_scores)`` for those rows."""

    def __init__(self, score: Scorer, max_batch: int = 32, max_wait: float = 0.005):
        self.score, self.max_batch, self.max_wait = score, max_batch, max_wait
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0  # model calls made, and the images they held: what /info reports
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="graft-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.put((pixels, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first) -> list:
        jobs, rows = [first], len(first[0])
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:  # closing: answer what was gathered, then stop
                self._queue.put(None)
                break
            jobs.append(job)
            rows += len(job[0])
        return jobs

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._gather(first)
            try:
                probs, ood = self.score(np.concatenate([pixels for pixels, _ in jobs]))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for pixels, future in jobs:
                end = start + len(pixels)
                future.set_result((probs[start:end], None if ood is None else ood[start:end]))
                start = end
            self.images += start

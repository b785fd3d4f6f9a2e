"""Samples of a split that represent every class: for int8 calibration and export checks."""

from __future__ import annotations

import os

import numpy as np


def stratified(items: list, limit: int, seed: int) -> list:
    """Up to ``limit`` of ``(path, label)`` items still on disk, every class represented: each
    class's items shuffled (seeded), then taken round-robin across classes. The first items in
    folder order would be one or two classes only."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for path, label in items:
        if os.path.isfile(path):
            by_class.setdefault(label, []).append((path, label))
    queues = [[group[i] for i in rng.permutation(len(group))]
              for _, group in sorted(by_class.items())]
    out: list = []
    for depth in range(max(map(len, queues), default=0)):
        out += [q[depth] for q in queues if depth < len(q)]
    return out[:limit]

"""Shared fixtures: a private weights cache and small generated image folders."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Converted weights go to a fresh cache, so the conversion itself is exercised."""
    path = tmp_path_factory.mktemp("graftkit-cache")
    old = os.environ.get("GRAFTKIT_CACHE_DIR")
    os.environ["GRAFTKIT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GRAFTKIT_CACHE_DIR", None)
    else:
        os.environ["GRAFTKIT_CACHE_DIR"] = old


COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 40,
                seed: int = 0) -> Path:
    """Classes told apart by colour: learnable in a few steps, so tests stay fast."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 60, (size, size, 3))
            arr = np.clip(noise + np.array(COLORS[c % len(COLORS)]) * 0.75, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small real run (both phases) shared by the predict/evaluate/inspect tests."""
    from graftkit.train.workflow import fit

    root = tmp_path_factory.mktemp("shared-run")
    data = make_folder(root / "data", per_class=10)
    # unfreeze="all": the path that fine-tunes through the whole base (the CLI tests cover the
    # default, top blocks on cached activations).
    fit(data, root / "run", image_size=32, head_epochs=15, fine_tune_epochs=1, batch_size=8,
        lr=1e-2, fine_tune_lr=1e-4, unfreeze="all", verbose=0, log=lambda _msg: None)
    return root


def wait_for_phase2_epoch(run: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The checkpoint state once ``proc`` (a ``graft fit`` of ``run``) saved a phase-2 epoch.

    Fails the test when the process ends first or no such checkpoint appears in time.
    """
    state_file = run / ".checkpoint" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fit ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("phase") == "fine_tune" and state.get("epoch", 0) >= 1:
            return state
        time.sleep(0.05)
    pytest.fail("no phase-2 checkpoint appeared in time")

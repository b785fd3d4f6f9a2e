"""report.html: self-contained, and rendered for real in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from graftkit.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def test_report_is_self_contained(trained_run, capsys):
    run = trained_run / "run"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    for section in ("Run card", "Training curves", "Confusion matrix", "Per-class precision",
                    "Most confused pairs", "Top losses"):
        assert section in page
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing from the network
    assert page.count("data:image/jpeg;base64,") == 6  # every validation image (6 < 16)
    assert "data:image/png;base64," in page  # the curves
    assert "mode auto" in page and "chose " in page  # what --mode decided, and why


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install "
                    "chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    page = (trained_run / "run" / "report.html").resolve()
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'id="top-losses"' in dom and dom.count("<img") >= 7
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1800, 1200)
    assert pixels.std() > 20  # text, tables and images, not a blank page
    assert (pixels < 100).mean() > 0.01  # dark pixels: text and photos were drawn

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
    # every validation image (6 < 16), each with where the model looked and 3 closest images
    assert len(re.findall(r"<div class=tile(?: wrong)? why>|<div class='tile(?: wrong)? why'>",
                          page)) >= 6
    assert "id=least-confident>" in page
    shown = page.count("class=heat")
    assert shown >= 6 and page.count("class=near") == 3 * shown
    assert "Grad-CAM++" in page
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


@pytest.mark.slow
def test_report_charts_render_with_their_axes(trained_run, tmp_path):
    """The SVG charts as a browser builds them: every attribute quoted (an unquoted
    ``stroke-dasharray=4/>`` swallowed the axis labels into the line), axis labels and ticks
    visible, dashed lines dashed, settings as a table, tile numbers on one line."""
    import os

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the report's browser test must run in CI: playwright or Chromium missing")
        pytest.skip("playwright or Chromium is missing")
    run = trained_run / "run"
    assert main(["report", str(run)]) == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((run / "report.html").resolve().as_uri())
        charts = page.locator("svg.chart")
        assert charts.count() == 3  # reliability before/after, open-set scores
        for i in range(charts.count()):
            chart = charts.nth(i)
            assert chart.locator("line text").count() == 0
            axis = chart.locator("text.axis")
            assert axis.count() == 2
            for j in range(2):
                box = axis.nth(j).bounding_box()
                assert axis.nth(j).is_visible() and box and box["width"] > 10
            assert chart.locator("text.tick").count() == 10
            dashed = chart.locator("line[stroke-dasharray='4']")
            assert dashed.count() == 1
        assert "confidence" in charts.nth(0).locator("text.axis").first.text_content()
        assert page.locator("#settings tr").count() >= 10
        assert "{" not in page.locator("table.card").first.inner_text()  # no raw JSON
        for n in page.locator(".tile .n").all():
            assert n.bounding_box()["height"] < 20, n.inner_text()  # one line: never mid-digit
        browser.close()


def test_a_copied_run_keeps_its_heatmaps_without_the_data(trained_run, tmp_path):
    """The heatmaps and closest thumbnails live in the run folder: graft report on a copy,
    with the data folder gone, still shows them (the photos themselves are then missing)."""
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(trained_run / "run", copy)
    assert (copy / "explain" / "index.json").is_file() and (copy / "closest.jpg").is_file()
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert page.count("class=heat") >= 6 and "closest training images" in page

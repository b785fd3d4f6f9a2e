"""The ONNX export in a browser: ONNX Runtime Web in headless Chromium, on graft serve's
/browser/ page (the example page of docs/examples), against graft predict."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="graft serve needs the serve extra (make test installs it)")

from graftkit.serve.browser import ORT_FILES, ort_web_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_served_page_is_the_documented_example():
    """One page, two places: users copy docs/examples, graft serve ships the package's copy."""
    for name in ("browser.html", "browser.js"):
        assert (ROOT / "docs" / "examples" / name).read_bytes() == \
            (ROOT / "src" / "graftkit" / "serve" / "static" / name).read_bytes(), name


def test_without_an_onnx_export_the_page_says_what_to_run(trained_run):
    from fastapi.testclient import TestClient

    from graftkit.serve.server import Service

    service = Service(trained_run / "run")  # the shared run has no ONNX export
    try:
        client = TestClient(service.app, base_url="http://127.0.0.1")
        info = client.get("/info").json()["browser"]
        assert info["available"] is False and "--format onnx" in info["why_not"]
        assert client.get("/browser/").status_code == 200  # the page itself, to say so
        missing = client.get("/browser/model.onnx")
        assert missing.status_code == 404 and "graft export" in missing.json()["detail"]
        assert client.get("/browser/ort/../../metrics.json").status_code == 404
        assert client.get("/browser/split.json").status_code == 404  # only the listed files
    finally:
        service.batcher.close()


def ort_or_skip() -> Path:
    """ONNX Runtime Web's files (make installs them with npm ci); under CI=true their absence
    fails the test."""
    found = ort_web_dir()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the browser test must run in CI: web/node_modules (npm ci in web/) "
                        "is missing")
        pytest.skip("ONNX Runtime Web is missing: cd web && npm ci")
    return found


def at_model_size(paths: list[str], size: int, folder: Path) -> list[str]:
    """The images as graftkit gives them to the model, saved as PNGs at its size: the browser's
    own resizing is then the identity, and what is compared is the runtime alone."""
    from graftkit.data.images import load_image

    files = []
    for i, p in enumerate(paths):
        files.append(str(folder / f"{i:05d}.png"))
        Image.fromarray(load_image(p, size)).save(files[-1])
    return files


def in_chromium(run: Path, files: list[str]) -> tuple[list[dict], list[str]]:
    """graft serve's /browser/ page (reached from the try page's link) on ``files``: what
    ONNX Runtime Web answered, and the lines the page showed."""
    from graftkit.serve.server import Service
    from tests.test_report import CHROMIUM
    from tests.test_serve import browser_or_skip, until

    sync_playwright = browser_or_skip()
    ort = ort_or_skip()
    assert set(ORT_FILES) <= {p.name for p in ort.iterdir()}
    service = Service(run)
    base = service.start()
    try:
        assert service.info()["browser"] == {"available": True, "why_not": None}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/")
            until(page, "() => document.getElementById('run').textContent.includes('classes')")
            assert not page.locator("#browser-link").evaluate("a => a.classList.contains('muted')")
            page.click("#browser-link")
            until(page, "() => document.getElementById('status').dataset.ready === 'true'"
                        " || document.getElementById('status').dataset.error === 'true'", 120)
            assert page.inner_text("#status").startswith("ready: "), errors
            page.set_input_files("#files", files)
            until(page, f"() => document.getElementById('status').dataset.done === '{len(files)}'",
                  600)
            got = page.evaluate("window.graftResults")
            shown = page.locator("#results li").all_inner_texts()
            browser.close()
    finally:
        service.stop()
    assert not errors
    return got, shown


@pytest.mark.slow
def test_onnx_runtime_web_in_chromium_gives_graft_predicts_answers(trained_run, tmp_path):
    """Every validation image: the same top-1 as graft predict, scores within 1e-4, and the
    same open-set score."""
    import graftkit
    from graftkit.data.inputs import Inputs
    from graftkit.deploy.export import export

    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    export(run, "onnx")
    clf = graftkit.load(run)
    paths = [p for p, _ in json.loads((run / "split.json").read_text())["val"]]
    expected = clf.predict_proba(paths)
    _, ood = clf.scored(Inputs.of_files(paths))
    got, shown = in_chromium(run, at_model_size(paths, clf.image_size, tmp_path))
    probabilities = np.array([r["probabilities"] for r in got])
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    np.testing.assert_allclose([r["ood_score"] for r in got], ood, atol=1e-3)
    assert [r["label"] for r in got] == [clf.classes[i] for i in expected.argmax(1)]
    assert shown[0].startswith(f"00000.png: {got[0]['label']} ")

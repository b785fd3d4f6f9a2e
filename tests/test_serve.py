"""graft serve: the API (every endpoint, bad uploads, size limit), the review's token, path
checks and moves, and both pages driven in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="graft serve needs the serve extra (make test installs it)")
from fastapi.testclient import TestClient  # noqa: E402

from graftkit.serve.batching import Batcher  # noqa: E402
from graftkit.serve.review import JOURNAL, SET_ASIDE, Review  # noqa: E402
from tests.test_report import CHROMIUM  # noqa: E402


def png_bytes(color=(200, 30, 30), size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=50_000, height=50_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(png_bytes(size=8))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def review_data(trained_run, tmp_path_factory) -> Path:
    """A copy of the run's data (the review moves files) with an exact duplicate under
    another class: a conflicting label, and a duplicate or a train/val leak."""
    data = tmp_path_factory.mktemp("serve") / "data"
    shutil.copytree(trained_run / "data", data)
    shutil.copy(data / "class_0" / "img_000.png", data / "class_1" / "copy_of_0.png")
    return data


@pytest.fixture(scope="module")
def service(trained_run, review_data):
    from graftkit.serve.server import Service

    svc = Service(trained_run / "run", data=str(review_data))
    svc.review.wait()  # the data check runs in the background
    yield svc
    svc.batcher.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(service.app, base_url="http://127.0.0.1")


def auth(service) -> dict:
    return {"X-Graft-Token": service.token}


# --- prediction API ------------------------------------------------------------------------


def test_predict_matches_graft_predict(service, client, trained_run):
    from graftkit.classifier import load

    files = sorted((trained_run / "data" / "class_2").glob("*.png"))[:2]
    files.insert(0, sorted((trained_run / "data" / "class_0").glob("*.png"))[0])
    r = client.post("/predict", files=[("file", (f.name, f.read_bytes(), "image/png"))
                                       for f in files])
    assert r.status_code == 200
    got = r.json()["predictions"]
    want = [p.as_dict() for p in load(trained_run / "run").predict(files, top_k=3)]
    assert [g["path"] for g in got] == [f.name for f in files]  # in order, the upload's name
    for g, w in zip(got, want):
        assert set(g) == set(w)  # exactly the fields of a `graft predict --format json` line
        assert g["label"] == w["label"] and g["known"] == w["known"]
        assert [lab for lab, _ in g["top_k"]] == [lab for lab, _ in w["top_k"]]
        np.testing.assert_allclose([p for _, p in g["top_k"]], [p for _, p in w["top_k"]],
                                   atol=1e-4)
        assert g["ood_score"] == pytest.approx(w["ood_score"], rel=1e-3, abs=1e-4)
    assert len(client.post("/predict?top_k=1", files={"file": ("a.png", png_bytes())})
               .json()["predictions"][0]["top_k"]) == 1


def test_predict_explain_adds_heatmaps_and_the_closest_images(service, client, trained_run):
    """explain=1: the same answer, with each label's heatmap as a small PNG to lay over the
    image and the closest training images with their thumbnails."""
    import base64
    import io

    from PIL import Image

    split = json.loads((trained_run / "run" / "split.json").read_text())
    f = Path(next(path for path, label in split["train"] if label == "class_1"))
    plain = client.post("/predict", files={"file": (f.name, f.read_bytes())}).json()
    r = client.post("/predict?explain=1", files={"file": (f.name, f.read_bytes())})
    assert r.status_code == 200, r.text
    got, want = r.json()["predictions"][0], plain["predictions"][0]
    assert got["label"] == want["label"] and got["path"] == f.name
    assert got["top_k"][0][1] == pytest.approx(want["top_k"][0][1], abs=1e-4)
    assert list(got["heatmaps"]) == [got["label"]]
    heat = Image.open(io.BytesIO(base64.b64decode(got["heatmaps"][got["label"]])))
    assert heat.size == (96, 96) and heat.mode == "RGBA"
    assert len(got["closest"]) == 3 and got["closest"][0]["name"] == f.name  # itself first
    assert got["closest"][0]["similarity"] == pytest.approx(1.0, abs=5e-3)
    thumb = Image.open(io.BytesIO(base64.b64decode(got["closest"][0]["thumbnail"])))
    assert thumb.size == (64, 64)
    assert "heatmaps" not in want  # only when asked


def test_info_health_schema_and_pages(client, service):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["classes"] == service.classifier.classes
    assert info["image_size"] == 32 and info["backbone"] == "efficientnet_lite0"
    assert 0 <= info["val_accuracy"] <= 1
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 404  # FastAPI's page loads a CDN script: off
    for path in ("/", "/review"):
        page = client.get(path).text
        assert "<script src=\"/static/" in page
        assert "http://" not in page and "https://" not in page and "//cdn" not in page
    for asset in ("graft.css", "try.js", "review.js"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and not re.search(r"https?://", r.text)
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert client.get("/static/app.py").status_code == 404


@pytest.mark.parametrize("upload, reason", [
    (("notes.txt", b"hello, not an image"), "notes.txt: not an image graftkit can read"),
    (("empty.png", b""), "empty.png: empty file"),
    (("bomb.png", bomb_png()), "bomb.png: too many pixels"),
    (("cut.png", png_bytes()[:60]), "cut.png: "),
])
def test_bad_uploads_are_400_with_the_reason(client, upload, reason):
    r = client.post("/predict", files=[("file", ("ok.png", png_bytes())), ("file", upload)])
    assert r.status_code == 400
    assert r.json()["detail"].startswith(reason)
    assert client.get("/healthz").status_code == 200  # and the server lives on


def test_bad_requests_are_400(client):
    assert client.post("/predict").json()["detail"] == \
        "send the image(s) as multipart form field 'file'"
    r = client.post("/predict", files={"image": ("a.png", png_bytes())})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.post("/predict?top_k=0", files={"file": ("a.png", png_bytes())})
    assert r.status_code == 400 and r.json()["detail"].startswith("top_k")
    r = client.post("/predict?reject=maybe", files={"file": ("a.png", png_bytes())})
    assert r.status_code == 400 and "--reject" in r.json()["detail"]


def test_upload_limit_is_413(service):
    from graftkit.serve.app import create_app
    from graftkit.serve.guard import BodyLimit

    small = TestClient(BodyLimit(create_app(service), 4096), base_url="http://127.0.0.1")
    big = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    r = small.post("/predict", files={"file": ("big.png", buf.getvalue())})
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while it streams
        yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(10):
            yield b"x" * 1024

    r = small.post("/predict", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert small.post("/predict", files={"file": ("a.png", png_bytes(size=8))}).status_code == 200


def test_batcher_gathers_concurrent_requests():
    calls = []

    def score(x):
        calls.append(len(x))
        time.sleep(0.05)
        return x[:, :1].astype(np.float32), None

    batcher = Batcher(score, max_batch=32, max_wait=0.005)
    try:
        futures = [batcher.submit(np.full((1, 1), i)) for i in range(12)]
        results = [f.result(timeout=10)[0] for f in futures]
    finally:
        batcher.close()
    assert [float(r[0, 0]) for r in results] == list(range(12))  # each gets its own rows
    assert len(calls) <= 3 and sum(calls) == 12  # not 12 model calls


# --- review: token, paths, moves, journal --------------------------------------------------


def listed(service, group: str) -> list[dict]:
    return next(g["items"] for g in service.review.summary()["groups"] if g["id"] == group)


def test_review_lists_the_findings(service, client):
    r = client.get("/review/api/items", headers=auth(service)).json()
    assert r["state"] == "ready" and r["can_move"]
    groups = {g["id"]: g["items"] for g in r["groups"]}
    assert groups["top_losses"]  # validation images by loss, from predictions.csv
    disagree = {i["path"] for i in groups["label_issues"]}
    assert {"class_0/img_000.png", "class_1/copy_of_0.png"} <= disagree
    assert all(i["why"] for g in groups.values() for i in g)
    key = groups["top_losses"][0]["key"]
    r = client.get("/review/api/image", params={"key": key}, headers=auth(service))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert client.get("/review/api/items", headers=auth(service)).json()["next"].startswith(
        "graft refit ")


def test_review_needs_the_token(service, client, review_data):
    key = listed(service, "label_issues")[0]["key"]
    before = sorted(p.relative_to(review_data) for p in review_data.rglob("*"))
    for headers in ({}, {"X-Graft-Token": "wrong"}):
        assert client.get("/review/api/items", headers=headers).status_code == 403
        assert client.get("/review/api/image", params={"key": key}, headers=headers) \
            .status_code == 403
        for path, body in (("relabel", {"key": key, "to": "class_2"}), ("set-aside", {"key": key}),
                           ("undo", {"id": "x"})):
            r = client.post(f"/review/api/{path}", json=body, headers=headers)
            assert r.status_code == 403 and "token" in r.json()["detail"]
    assert sorted(p.relative_to(review_data) for p in review_data.rglob("*")) == before


@pytest.mark.parametrize("key, status", [
    ("../../etc/passwd", 400), ("/etc/passwd", 400), ("class_0/../../outside.png", 400),
    ("class_0\\..\\x.png", 400), ("%2e%2e/%2e%2e/etc/passwd", 404), ("class_0/img_001.png", 404),
    ("C:/Windows/win.ini", 400), ("outside/0", 404),
])
def test_review_refuses_unlisted_paths(service, client, key, status):
    listed_keys = set(service.review.items)
    if key in listed_keys:
        pytest.skip("this file happens to be listed in this split")
    assert client.get("/review/api/image", params={"key": key}, headers=auth(service)) \
        .status_code == status
    r = client.post("/review/api/relabel", json={"key": key, "to": "class_2"}, headers=auth(service))
    assert r.status_code == status
    # URL-encoded by hand, then once more by the client: still no way out
    r = client.get("/review/api/image?key=..%2F..%2Fetc%2Fpasswd", headers=auth(service))
    assert r.status_code == 400


def test_review_refuses_symlinks_out_of_the_data(service, client, review_data, tmp_path):
    item = listed(service, "top_losses")[-1]
    path = review_data / item["path"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes((1, 2, 3)))
    backup = tmp_path / "backup.png"
    shutil.move(path, backup)
    try:
        os.symlink(secret, path)
        r = client.get("/review/api/image", params={"key": item["key"]}, headers=auth(service))
        assert r.status_code == 403
        r = client.post("/review/api/set-aside", json={"key": item["key"]}, headers=auth(service))
        assert r.status_code == 403 and path.is_symlink() and secret.is_file()
    finally:
        path.unlink()
        shutil.move(backup, path)


def journal(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / JOURNAL).read_text().splitlines()]


def test_relabel_set_aside_undo_with_journal(service, client, review_data):
    item = next(i for i in listed(service, "label_issues") if i["path"] == "class_1/copy_of_0.png")
    src = review_data / "class_1" / "copy_of_0.png"
    occupied = review_data / "class_2" / "copy_of_0.png"  # a name collision at the target
    occupied.write_bytes(b"not to be overwritten")
    content = src.read_bytes()
    try:
        r = client.post("/review/api/relabel", json={"key": item["key"], "to": "class_2"},
                        headers=auth(service))
        assert r.status_code == 200, r.text
        action = r.json()
        moved = review_data / "class_2" / "copy_of_0-1.png"
        assert action["to"] == "class_2/copy_of_0-1.png"
        assert not src.exists() and moved.read_bytes() == content
        assert occupied.read_bytes() == b"not to be overwritten"
        lines = journal(review_data)
        assert lines[-2]["action"] == "relabel" and lines[-2]["from"] == "class_1/copy_of_0.png"
        assert lines[-1] == {"id": action["id"], "done": True}
        now = next(i for i in listed(service, "label_issues") if i["key"] == item["key"])
        assert now["now"] == "class_2" and now["undo"] == action["id"]

        # undo after a restart: a new review of the same folder reads the journal
        again = Review(service.run_dir, service.classifier.classes, service.classifier.record,
                       str(review_data))
        again.load()
        assert [a["id"] for a in again.summary()["actions"]] == [action["id"]]
        back = again.undo(action["id"])
        assert back["to"] == "class_1/copy_of_0.png"
        assert src.read_bytes() == content and not moved.exists()
        r = client.post("/review/api/undo", json={"id": action["id"]}, headers=auth(service))
        assert r.status_code == 409  # already undone (by the other review)

        r = client.post("/review/api/set-aside", json={"key": item["key"]}, headers=auth(service))
        aside = review_data / SET_ASIDE / "class_1" / "copy_of_0.png"
        assert r.status_code == 200 and aside.read_bytes() == content and not src.exists()
        from graftkit.data.checks import check

        kinds = {f.kind for f in check(review_data).findings}
        assert "conflicting_labels" not in kinds  # the scan skips the set-aside copy
        r = client.post("/review/api/undo", json={"id": r.json()["id"]}, headers=auth(service))
        assert r.status_code == 200 and src.read_bytes() == content and not aside.exists()
    finally:
        occupied.unlink()


def test_interrupted_moves_are_settled_on_start(service, review_data):
    from graftkit.serve.review import Journal

    j = Journal(review_data)
    src = review_data / "class_2" / "img_005.png"
    dst = review_data / "class_0" / "moved_005.png"
    os.link(src, dst)  # a crash between the link and the unlink
    j.append({"id": "cut1", "action": "relabel", "key": "class_2/img_005.png",
              "from": "class_2/img_005.png", "to": "class_0/moved_005.png"})
    j.append({"id": "cut2", "action": "relabel", "key": "class_2/img_006.png",
              "from": "class_2/img_006.png", "to": "class_0/moved_006.png"})  # never moved
    try:
        Review(service.run_dir, service.classifier.classes, service.classifier.record,
               str(review_data))
        lines = journal(review_data)
        assert {"id": "cut1", "done": True} in lines
        assert any(e.get("id") == "cut2" and e.get("failed") for e in lines)
        assert dst.is_file() and not src.exists()
        assert (review_data / "class_2" / "img_006.png").is_file()
    finally:
        shutil.move(dst, src)
        (review_data / JOURNAL).write_text("")


def test_review_of_data_it_cannot_move(service, tmp_path, trained_run, monkeypatch):
    m = service.classifier.record
    table = tmp_path / "labels.csv"
    table.write_text("".join(f"{p},{p.parent.name}\n"
                             for p in sorted((trained_run / "data").rglob("*.png"))))
    writable = os.access
    monkeypatch.setattr("graftkit.serve.review.os.access",  # a table this user cannot write
                        lambda path, mode: writable(path, mode) and Path(path) != table)
    r = Review(service.run_dir, service.classifier.classes, m, str(table))
    monkeypatch.undo()
    r.load()
    s = r.summary()
    assert s["state"] == "ready" and not s["can_move"] and "read-only" in s["read_only"]
    assert s["mode"] == "table"
    with pytest.raises(Exception, match="cannot be moved"):
        r.set_aside(next(iter(r.items)))
    gone = Review(service.run_dir, service.classifier.classes, m, str(tmp_path / "nowhere"))
    assert gone.summary()["state"] == "unavailable" and "--data" in gone.summary()["message"]
    monkeypatch.setattr("graftkit.serve.review.os.access", lambda *a: False)
    locked = Review(service.run_dir, service.classifier.classes, m, str(trained_run / "data"))
    assert "read-only" in locked.why_read_only and locked.journal is None


# --- the command ---------------------------------------------------------------------------


def test_serve_command_errors_before_tensorflow(trained_run, capsys):
    import socket

    from graftkit.cli import main

    assert main(["serve", str(trained_run / "nope")]) == 5
    assert main(["serve", str(trained_run / "run"), "--port", "70000"]) == 2
    assert main(["serve", str(trained_run / "run"), "--max-upload-mb", "0"]) == 2
    assert main(["serve", str(trained_run / "run"), "--data", str(trained_run / "nodata")]) == 3
    assert main(["serve", str(trained_run / "run"), "--ort-web", str(trained_run)]) == 2
    assert "--ort-web" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run / "run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "Traceback" not in err


def test_graft_serve_runs_and_stops_on_ctrl_c(trained_run, review_data, tmp_path):
    """From another folder, with a restrictive umask: the printed URLs work; Ctrl-C stops it."""
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "graftkit.cli", "serve",
                             str(trained_run / "run"), "--data", str(review_data), "--port", "0",
                             "--host", "0.0.0.0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o077))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert "warning: listening on 0.0.0.0" in text
        review_url = next(w for w in text.split() if "/review?token=" in w)
        base = review_url.split("/review")[0]
        with urllib.request.urlopen(base + "/healthz", timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        token = review_url.split("token=")[1]
        ask = urllib.request.Request(f"{base}/review/api/items", headers={"X-Graft-Token": token})
        with urllib.request.urlopen(ask, timeout=30) as r:
            assert json.load(r)["data"] == str(review_data)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "graft serve: stopped" in out and "Traceback" not in err


# --- both pages in a real browser ----------------------------------------------------------

def browser_or_skip():
    """Playwright driving the system Chromium (never a browser download); under CI=true a
    missing one fails the test instead of skipping it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "playwright (make test installs it)" if sync_playwright is None else \
        "Chromium (apt-get install chromium; .ci/run installs it)" if CHROMIUM is None else ""
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {missing} is missing")
        pytest.skip(f"{missing} is missing")
    return sync_playwright


def until(page, script: str, timeout: float = 60) -> None:
    """Poll ``script`` in the page until it is true: the pages' Content-Security-Policy forbids
    the eval that Playwright's wait_for_function needs."""
    deadline = time.time() + timeout
    while not page.evaluate(script):
        if time.time() > deadline:
            raise AssertionError(f"still false after {timeout} s: {script}")
        time.sleep(0.1)


def test_serving_in_process_leaves_the_process_logging_alone(trained_run, capsys):
    """uvicorn's default logging config would run ``dictConfig``, which closes the stream of
    every handler made before it that is not stderr at that moment (absl's, made with
    TensorFlow's import): in a notebook or under pytest, that stream is the host's."""
    import io
    import logging

    from absl.logging import PythonHandler

    from graftkit.serve.server import Service

    host_stream = io.StringIO()
    handler = PythonHandler(host_stream)  # absl's own class: it closes its stream on close()
    root_handlers = list(logging.getLogger().handlers)
    service = Service(trained_run / "run")
    service.start()
    try:
        logging.getLogger("uvicorn.error").warning("a warning from uvicorn")
    finally:
        service.stop()
    assert not host_stream.closed and logging.getLogger().handlers == root_handlers
    assert "WARNING: a warning from uvicorn" in capsys.readouterr().err
    handler.close()


@pytest.mark.slow
def test_both_pages_in_headless_chromium(trained_run, tmp_path):
    sync_playwright = browser_or_skip()
    from graftkit.serve.server import Service

    data = tmp_path / "data"
    shutil.copytree(trained_run / "data", data)
    service = Service(trained_run / "run", data=str(data))
    base = service.start()
    photo = sorted((data / "class_2").glob("*.png"))[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream"])  # a synthetic camera, permission granted
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.on("dialog", lambda d: d.accept())
            page.goto(base + "/")
            until(page, "() => document.getElementById('run').textContent.includes('classes')")
            page.set_input_files("#files", str(photo))
            page.wait_for_selector(".card[data-label]", timeout=60_000)
            card = page.locator(".card").first
            want = service.classifier.predict([photo])[0]
            assert card.get_attribute("data-label") == want.label
            assert card.locator(".label").inner_text() == str(want)
            assert card.locator(".bar").count() == 3
            card.locator("button.why").click()  # where it looked, and what it resembles
            page.wait_for_selector(".card .view img.heat", timeout=60_000)
            heat = card.locator(".view img.heat")
            assert heat.get_attribute("data-label") == want.label
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            until(page, "() => { const i = document.querySelector('.card .view img.heat');"
                        " return i.complete && i.naturalWidth === 96; }")
            assert page.evaluate("() => getComputedStyle(document.querySelector("
                                 "'.card .view img.heat')).backgroundColor") == \
                "rgba(0, 0, 0, 0)"  # the photo shows through the heatmap's clear parts
            assert card.locator(".closest figure").count() == 3
            until(page, "() => [...document.querySelectorAll('.card .closest img')]"
                        ".every(i => i.complete && i.naturalWidth === 64)")
            card.locator("button.toggle-heat").click()
            assert heat.is_hidden() and card.locator(".view img").first.is_visible()
            card.locator("button.toggle-heat").click()
            assert heat.is_visible()
            page.click("#webcam")
            until(page, "() => document.getElementById('video').videoWidth > 0")
            page.click("#snap")
            page.wait_for_selector(".card[data-name='webcam-1.jpg'][data-label]", timeout=60_000)
            assert page.locator(".card").count() == 2
            page.screenshot(path=str(tmp_path / "try.png"))

            page.click("#review-link")  # no token in this tab yet: the page says where it is
            page.wait_for_selector("#state.error")
            assert "review URL that graft serve printed" in page.inner_text("#state")

            page.goto(f"{base}/review?token={service.token}")
            page.wait_for_selector("#top_losses .card .relabel", timeout=120_000)
            assert page.url == f"{base}/review"  # the token left the address bar and history
            first = page.locator("#top_losses .card").first
            path = first.get_attribute("data-path")
            label = path.split("/")[0]
            item = next(i for g in service.review.summary()["groups"] if g["id"] == "top_losses"
                        for i in g["items"] if i["path"] == path)
            menu = first.locator("select")
            if item["predicted"] and item["predicted"] != label:  # starts on the prediction
                assert menu.input_value() == item["predicted"]
            else:  # nothing to suggest: no class is preselected, Relabel waits for a choice
                assert menu.input_value() == "" and first.locator(".relabel").is_disabled()
            target = first.locator("select option").nth(1).get_attribute("value")
            menu.select_option(target)
            until(page, "() => { const i = document.querySelector('#top_losses .card img');"
                        " return i.complete && i.naturalWidth > 0; }")
            assert first.locator("img").get_attribute("src").startswith("blob:")
            first.locator(".relabel").click()
            page.wait_for_selector("#message:not([hidden])")
            message = page.inner_text("#message")  # "relabelled: FROM → TO (journal: ID)"
            assert message.startswith(f"relabelled: {path} \u2192 {target}/"), message
            moved = data / message.split("\u2192 ")[1].split(" (journal")[0]
            assert moved.is_file() and not (data / path).exists()
            assert label != target and moved.parent.name == target
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)

            # relabel -> set aside -> undo -> undo: back home (undo went one level deep). The
            # notice shows once the page is drawn again, so each click is on a card drawn after
            # the action before it.
            def notice(start: str) -> None:
                until(page, "() => { const m = document.getElementById('message');"
                            f" return !m.hidden && m.textContent.startsWith('{start}'); }}")

            cards = page.locator("#top_losses .card")
            cards.first.locator(".set-aside").click()
            notice("set aside")
            assert not moved.exists()
            for _ in range(2):
                cards.first.locator(".undo").click()
                notice("undone")
            assert (data / path).is_file() and not moved.exists()

            # two moves, then "Restore" on the card takes both back at once
            cards.first.locator("select").select_option(index=1)
            cards.first.locator(".relabel").click()
            notice("relabelled")
            cards.first.locator(".set-aside").click()
            notice("set aside")
            cards.first.locator(".restore").click()
            notice("undone")
            assert (data / path).is_file()

            # "Restore every image" after moves of two images
            cards.nth(0).locator("select").select_option(index=1)
            cards.nth(0).locator(".relabel").click()
            notice("relabelled")
            cards.nth(1).locator(".set-aside").click()
            notice("set aside")
            page.click("#restore-all")
            notice("restored 2 image(s)")
            assert (data / path).is_file()
            assert not list((data / SET_ASIDE).rglob("*.png"))

            page.goto(base + "/")  # the same tab keeps its token: the link now works
            page.click("#review-link")
            page.wait_for_selector("#top_losses .card .relabel", timeout=60_000)
            csp = [m for m in console if "Content Security Policy" in m]
            assert csp == [], csp
            browser.close()
    finally:
        service.stop()
        time.sleep(0.5)
        service.batcher.close()
    shots = os.environ.get("GRAFTKIT_SCREENSHOTS")
    if shots:  # for looking at the pages by eye
        for name in ("try.png", "review.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)

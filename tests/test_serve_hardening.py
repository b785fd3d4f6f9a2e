"""graft serve as an attacker and a crowd would use it: fair batching, bounded uploads, a journal
that survives cut lines and two servers, undo all the way back, Host/Origin/token checks,
slow clients, and the OpenAPI schema checked by Schemathesis."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="graft serve needs the serve extra (make test installs it)")
from fastapi.testclient import TestClient  # noqa: E402

from graftkit.serve.batching import Batcher  # noqa: E402
from graftkit.serve.journal import JOURNAL, SET_ASIDE, Journal, JournalError  # noqa: E402
from tests.test_serve import png_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent


# --- fair batching --------------------------------------------------------------------------


def test_a_large_request_is_sliced_and_a_small_one_goes_next():
    calls: list[list[int]] = []
    first_call = threading.Event()

    def score(x):
        calls.append(x[:, 0].tolist())
        first_call.set()
        time.sleep(0.02)
        return x[:, :1].astype(np.float32), x[:, 0].astype(np.float32)

    batcher = Batcher(score, max_batch=32, max_wait=0.0)
    try:
        big = batcher.submit(np.arange(1000).reshape(-1, 1))
        first_call.wait(5)
        small = batcher.submit(np.array([[-1]]))
        probs, ood = small.result(timeout=10)
        assert not big.done()  # the one-image request did not wait for the 1,000 images
        big_probs, big_ood = big.result(timeout=60)
    finally:
        batcher.close()
    assert probs.tolist() == [[-1.0]] and ood.tolist() == [-1.0]
    assert [i for i, rows in enumerate(calls) if -1 in rows] in ([0], [1])  # the next call
    assert big_probs[:, 0].tolist() == list(range(1000))  # every row back, in order
    assert big_ood.tolist() == list(range(1000))
    assert max(map(len, calls)) <= 32 and sum(map(len, calls)) == 1001


def test_health_says_when_the_model_is_stuck():
    release = threading.Event()

    def score(x):
        release.wait(10)
        return x.astype(np.float32), None

    batcher = Batcher(score, max_batch=4, max_wait=0.0, stuck_after=0.2)
    try:
        assert batcher.health()["status"] == "ok"
        future = batcher.submit(np.ones((6, 1)))
        time.sleep(0.5)
        health = batcher.health()
        assert health["status"] == "stuck" and health["model_call_s"] >= 0.2
        assert health["waiting_images"] == 6 and health["waiting_requests"] == 1
        release.set()
        future.result(timeout=10)
        assert batcher.health() | {"model_call_s": 0} == {
            "status": "ok", "waiting_images": 0, "waiting_requests": 0, "oldest_wait_s": 0.0,
            "model_call_s": 0}
    finally:
        release.set()
        batcher.close()


# --- the journal: cut lines, bad paths, undo all the way back --------------------------------


def folder(root: Path, n: int = 4) -> Path:
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        (root / "a" / f"x{i}.png").write_bytes(png_bytes((i, 2 * i, 3 * i)))
    return root


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")
            and SET_ASIDE not in p.parts}


def lines(root: Path) -> list[str]:
    return (root / JOURNAL).read_text().splitlines()


def test_an_append_after_a_cut_line_starts_a_fresh_line(tmp_path):
    root = folder(tmp_path / "data")
    j = Journal(root)
    (root / JOURNAL).write_text('{"id":"t","act')  # power loss mid-line
    entry = j.move("a/x0.png", "relabel", "a/x0.png", root / "b" / "x0.png")
    assert lines(root)[0] == '{"id":"t","act'
    assert json.loads(lines(root)[1])["id"] == entry["id"]
    history = j.history()
    assert history.bad_lines == [1] and history.where("a/x0.png") == "b/x0.png"
    j.undo(entry["id"])
    assert (root / "a" / "x0.png").is_file() and not (root / "b" / "x0.png").exists()


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "a/../../x.png", "C:/x.png",
                                 "a\\..\\x.png", ""])
def test_journal_paths_are_checked_like_request_keys(tmp_path, bad):
    root = folder(tmp_path / "data")
    j = Journal(root)
    j.append({"id": "evil", "time": "2026-12-04T10:00:00+00:00", "action": "relabel",
              "key": "a/x1.png", "from": "a/x1.png", "to": bad})
    j.append({"id": "evil", "done": True})
    history = j.history()
    assert history.bad_lines == [1] and history.stacks == {}
    with pytest.raises(JournalError):
        j.undo("evil")
    assert j.restore_since(None) == ([], [])
    assert (root / "a" / "x1.png").is_file()


def test_undo_walks_the_chain_back_and_restore_goes_all_the_way(tmp_path):
    root = folder(tmp_path / "data")
    before = digests(root)
    j = Journal(root)
    relabel = j.move("a/x0.png", "relabel", "a/x0.png", root / "b" / "x0.png")
    aside = j.move("a/x0.png", "set_aside", "b/x0.png", root / SET_ASIDE / "b" / "x0.png")
    j.undo(aside["id"])
    assert j.history().where("a/x0.png") == "b/x0.png"
    j.undo(relabel["id"])  # failed before: "not the last one on its image"
    assert digests(root) == before and j.history().stacks == {}

    # undoing an early move takes the later ones with it, in one move of the file
    first = j.move("a/x1.png", "relabel", "a/x1.png", root / "b" / "x1.png")
    j.move("a/x1.png", "relabel", "b/x1.png", root / "c" / "x1.png")
    j.move("a/x1.png", "set_aside", "c/x1.png", root / SET_ASIDE / "c" / "x1.png")
    back = j.undo(first["id"])
    assert back["from"] == f"{SET_ASIDE}/c/x1.png" and back["to"] == "a/x1.png"
    assert len(back["undoes"]) == 3 and digests(root) == before
    with pytest.raises(JournalError, match="undone already"):
        j.undo(first["id"])

    j.move("a/x2.png", "relabel", "a/x2.png", root / "b" / "x2.png")
    j.move("a/x2.png", "relabel", "b/x2.png", root / "c" / "x2.png")
    assert j.restore("a/x2.png")["to"] == "a/x2.png" and digests(root) == before
    with pytest.raises(JournalError, match="nothing to restore"):
        j.restore("a/x2.png")


def test_restore_since_a_time_and_everything(tmp_path):
    from graftkit.serve.journal import parse_time

    root = folder(tmp_path / "data")
    before = digests(root)
    j = Journal(root)
    old = j.move("a/x0.png", "relabel", "a/x0.png", root / "b" / "x0.png")
    j.move("a/x1.png", "relabel", "a/x1.png", root / "b" / "x1.png")
    # make the first two moves an hour old: "since 30m" must leave them alone
    text = (root / JOURNAL).read_text()
    stamp = json.loads(text.splitlines()[0])["time"]
    hour_ago = (parse_time(stamp) - __import__("datetime").timedelta(hours=1)).isoformat()
    (root / JOURNAL).write_text(text.replace(stamp, hour_ago))
    j.move("a/x0.png", "set_aside", "b/x0.png", root / SET_ASIDE / "b" / "x0.png")
    j.move("a/x2.png", "relabel", "a/x2.png", root / "c" / "x2.png")
    done, problems = j.restore_since(parse_time("30m"))
    assert problems == [] and len(done) == 2
    history = j.history()
    assert history.where("a/x0.png") == "b/x0.png" and history.where("a/x2.png") == "a/x2.png"
    assert [a["id"] for a in history.stacks["a/x0.png"]] == [old["id"]]
    done, problems = j.restore_since(None)
    assert len(done) == 2 and problems == [] and digests(root) == before


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_a_set_aside_symlink_that_dangles_is_undoable(tmp_path):
    root = folder(tmp_path / "data")
    os.symlink("x0.png", root / "a" / "link.png")  # relative: dangles once moved elsewhere
    j = Journal(root)
    aside = j.move("a/link.png", "set_aside", "a/link.png", root / SET_ASIDE / "a" / "link.png")
    moved = root / SET_ASIDE / "a" / "link.png"
    assert moved.is_symlink() and not moved.exists()  # dangling now
    j.undo(aside["id"])
    assert (root / "a" / "link.png").is_symlink() and (root / "a" / "link.png").is_file()
    assert os.readlink(root / "a" / "link.png") == "x0.png"


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_a_dangling_link_cut_short_mid_move_is_settled(tmp_path):
    """A set-aside link dangles once linked elsewhere: settling the move compares the links
    themselves (stat would follow them and fail at start-up)."""
    root = folder(tmp_path / "data")
    j = Journal(root)
    assert j.recover() == 0 and not (root / ".graft-journal.lock").exists()  # nothing journalled
    os.symlink("x0.png", root / "a" / "link.png")
    (root / SET_ASIDE / "a").mkdir(parents=True)
    os.link(root / "a" / "link.png", root / SET_ASIDE / "a" / "link.png", follow_symlinks=False)
    j.append({"id": "cut", "time": "2026-12-04T10:00:00+00:00", "action": "set_aside",
              "key": "a/link.png", "from": "a/link.png", "to": f"{SET_ASIDE}/a/link.png"})
    assert j.recover() == 1
    assert not os.path.lexists(root / "a" / "link.png")
    assert j.history().where("a/link.png") == f"{SET_ASIDE}/a/link.png"
    j.undo("cut")
    assert os.readlink(root / "a" / "link.png") == "x0.png"


def test_moves_cut_short_are_settled_and_undoable(tmp_path):
    root = folder(tmp_path / "data")
    j = Journal(root)
    os.link(root / "a" / "x0.png", root / "b" / "x0.png")  # killed between link and unlink
    j.append({"id": "cut1", "time": "2026-12-04T10:00:00+00:00", "action": "relabel",
              "key": "a/x0.png", "from": "a/x0.png", "to": "b/x0.png"})
    j.append({"id": "cut2", "time": "2026-12-04T10:00:00+00:00", "action": "relabel",
              "key": "a/x1.png", "from": "a/x1.png", "to": "b/x1.png"})  # killed before the link
    assert j.recover() == 2
    assert not (root / "a" / "x0.png").exists() and (root / "a" / "x1.png").is_file()
    assert j.history().where("a/x0.png") == "b/x0.png" and j.history().unsettled == []
    j.undo("cut1")
    assert (root / "a" / "x0.png").is_file()


def test_two_servers_on_one_folder_never_lose_an_image(service_pair, tmp_path):
    """Conflicting actions from two reviews of one folder, from two threads at once: every
    image stays accounted for, and "restore everything" brings each one home."""
    first, second, data = service_pair
    before = digests(data)
    keys = [k for k in first.items if not k.startswith("outside/")]
    assert len(keys) >= 4
    errors: list[str] = []

    def burst(review, seed):
        rng = np.random.default_rng(seed)
        for _ in range(24):
            key = keys[int(rng.integers(len(keys)))]
            try:
                if rng.random() < 0.5:
                    review.relabel(key, review.classes[int(rng.integers(len(review.classes)))])
                elif rng.random() < 0.7:
                    review.set_aside(key)
                else:
                    undo = review.summary()["actions"]
                    if undo:
                        review.undo(undo[int(rng.integers(len(undo)))]["id"])
            except JournalError as exc:  # 409s: already there, already set aside...
                assert exc.status in (404, 409), str(exc)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=burst, args=(r, s))
               for r, s in ((first, 1), (second, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    away = first.history().stacks
    assert {k: s[-1]["to"] for k, s in away.items()} == \
        {k: s[-1]["to"] for k, s in second.history().stacks.items()}  # both see one truth
    for key, stack in away.items():  # the journal says where each image is, and it is there
        assert (data / stack[-1]["to"]).is_file(), key
    result = second.restore_since(None)
    assert result["problems"] == [] and result["restored"] == len(away)
    assert digests(data) == before and first.summary()["actions"] == []


@pytest.fixture
def service_pair(trained_run, tmp_path):
    from graftkit.classifier import load
    from graftkit.serve.review import Review

    data = tmp_path / "data"
    shutil.copytree(trained_run / "data", data)
    clf = load(trained_run / "run")
    reviews = []
    for _ in range(2):
        r = Review(trained_run / "run", clf.classes, clf.record, str(data))
        r.load()
        reviews.append(r)
    return reviews[0], reviews[1], data


def test_graft_review_command(tmp_path, capsys):
    from graftkit.cli import main

    root = folder(tmp_path / "data")
    before = digests(root)
    assert main(["review", "log", str(root)]) == 3  # no journal yet
    assert "nothing to undo" in capsys.readouterr().err
    j = Journal(root)
    a = j.move("a/x0.png", "relabel", "a/x0.png", root / "b" / "x0.png")
    j.move("a/x0.png", "set_aside", "b/x0.png", root / SET_ASIDE / "b" / "x0.png")
    j.move("a/x1.png", "relabel", "a/x1.png", root / "c" / "x1.png")
    b = j.move("a/x2.png", "relabel", "a/x2.png", root / "c" / "x2.png")
    assert main(["review", "log", str(root)]) == 0
    out = capsys.readouterr().out
    assert a["id"] in out and "a/x0.png -> b/x0.png" in out and "set aside" in out
    assert main(["review", "undo", str(root)]) == 2  # which moves?
    assert "--all" in capsys.readouterr().err
    assert main(["review", "undo", str(root), "--all", "--since", "1h"]) == 2
    assert main(["review", "undo", str(root), "--since", "yesterday-ish"]) == 3
    assert "--since" in capsys.readouterr().err
    assert main(["review", "undo", str(root), b["id"]]) == 0
    assert (root / "a" / "x2.png").is_file()
    assert main(["review", "undo", str(root), "--image", "a/x0.png"]) == 0
    assert (root / "a" / "x0.png").is_file()
    assert main(["review", "undo", str(root), "nonexistent1"]) == 3
    assert main(["review", "undo", str(root), "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) put back" in out
    assert digests(root) == before
    assert main(["review", "undo", str(tmp_path / "nowhere"), "--all"]) == 3
    assert "Traceback" not in capsys.readouterr().err


# --- the HTTP side: Host, Origin, token, headers, limits --------------------------------------


@pytest.fixture(scope="module")
def guarded(trained_run, tmp_path_factory):
    from graftkit.serve.server import Service

    data = tmp_path_factory.mktemp("guarded") / "data"
    shutil.copytree(trained_run / "data", data)
    log: list[str] = []
    svc = Service(trained_run / "run", data=str(data), max_files=5, max_pixels=500 * 500,
                  log=log.append, port=8123)
    svc.review.wait()
    yield svc, log
    svc.batcher.close()


def test_foreign_hosts_and_origins_are_refused(guarded):
    svc, _ = guarded
    token = {"X-Graft-Token": svc.token}
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    assert client.get("/info").status_code == 200
    for host in ("evil.example", "evil.example:8123", "localhost.evil.example", "127.0.0.1:9999"):
        r = client.get("/info", headers={"Host": host})
        assert r.status_code == 400 and "--allow-host" in r.json()["detail"], host
        r = client.post("/review/api/set-aside", json={"key": "a"}, headers={**token, "Host": host})
        assert r.status_code == 400
    for ok in ("localhost:8123", "[::1]:8123", "127.0.0.1", "192.168.1.20:8123"):
        assert client.get("/info", headers={"Host": ok}).status_code == 200, ok
    key = next(iter(svc.review.items))
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        r = client.post("/review/api/set-aside", json={"key": key},
                        headers={**token, "Origin": origin})
        assert r.status_code == 403 and "may not send" in r.json()["detail"], origin
        r = client.post("/predict", files={"file": ("a.png", png_bytes())},
                        headers={"Origin": origin})
        assert r.status_code == 403
    r = client.post("/predict", files={"file": ("a.png", png_bytes())},
                    headers={"Origin": "http://127.0.0.1:8123"})
    assert r.status_code == 200
    allowed = TestClient(svc.app, base_url="http://graft.internal:8123")
    assert allowed.get("/info").status_code == 400
    svc.guard.names.add("graft.internal")
    try:
        assert allowed.get("/info").status_code == 200
    finally:
        svc.guard.names.discard("graft.internal")


def test_the_token_comes_from_the_header_and_is_checked_before_the_body(guarded):
    svc, _ = guarded
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    key = next(iter(svc.review.items))
    r = client.get(f"/review/api/items?token={svc.token}")
    assert r.status_code == 403  # a token in a URL lands in history and proxy logs
    r = client.get("/review/api/image", params={"key": key, "token": svc.token})
    assert r.status_code == 403
    r = client.post("/review/api/relabel", content=b"{not json", headers={
        "X-Graft-Token": "wrong", "Content-Type": "application/json"})
    assert r.status_code == 403  # refused before the body was parsed (a 400 would mean parsed)
    r = client.post("/review/api/relabel", content=b"{not json", headers={
        "X-Graft-Token": svc.token, "Content-Type": "application/json"})
    assert r.status_code == 400


def test_every_response_carries_the_security_headers(guarded):
    svc, _ = guarded
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    answers = [client.get("/"), client.get("/review"), client.get("/info"),
               client.get("/static/try.js"), client.get("/review/api/items"),
               client.get("/info", headers={"Host": "evil.example"}),
               client.post("/predict", files={"file": ("x.txt", b"text")})]
    for r in answers:
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp


def test_access_log_has_one_line_per_request_without_the_token(guarded):
    svc, log = guarded
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    log.clear()
    client.get(f"/review?token={svc.token}")
    client.get("/review/api/items", headers={"X-Graft-Token": svc.token})
    client.post("/predict?top_k=2", files={"file": ("a.png", png_bytes())})
    assert len(log) == 3
    assert all(svc.token not in line for line in log)
    assert '"GET /review?token=%2A%2A%2A" 200' in log[0]
    assert '"GET /review/api/items" 200' in log[1]
    assert '"POST /predict?top_k=2" 200' in log[2] and log[2].endswith(" ms")


def test_upload_limits_count_pixels_formats_and_reject(guarded, tmp_path):
    svc, _ = guarded
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    r = client.post("/predict", files=[("file", (f"{i}.png", png_bytes())) for i in range(6)])
    assert r.status_code == 400 and "at most 5 images" in r.json()["detail"]
    assert "--max-files" in r.json()["detail"]
    assert client.post("/predict", files=[("file", (f"{i}.png", png_bytes()))
                                          for i in range(5)]).status_code == 200
    big = io.BytesIO()
    Image.new("RGB", (600, 600), (9, 9, 9)).save(big, "PNG")  # 360,000 px > 250,000
    r = client.post("/predict", files={"file": ("big.png", big.getvalue())})
    assert r.status_code == 400 and "--max-pixels" in r.json()["detail"]
    tiff = io.BytesIO()
    Image.new("RGB", (20, 20)).save(tiff, "TIFF")  # a format graftkit does not read, named .png
    r = client.post("/predict", files={"file": ("photo.png", tiff.getvalue())})
    assert r.status_code == 400 and "not an image graftkit can read" in r.json()["detail"]
    for bad in ("nan", "inf", "-inf", "NaN"):
        r = client.post(f"/predict?reject={bad}", files={"file": ("a.png", png_bytes())})
        assert r.status_code == 400 and "finite" in r.json()["detail"], bad


def test_the_schema_tells_the_truth(guarded):
    svc, _ = guarded
    schema = TestClient(svc.app, base_url="http://127.0.0.1:8123").get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["token"] == {
        "type": "apiKey", "in": "header", "name": "X-Graft-Token",
        "description": "the token in the review URL graft serve prints"}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            assert ("security" in op) == path.startswith("/review/api/"), (method, path)
            if path.startswith("/review/api/"):
                assert "403" in op["responses"]
            assert "200" in op["responses"]
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["responses"]) == {"200", "400", "413"}
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    body = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    assert body["properties"]["file"]["minItems"] == 1
    assert body["properties"]["file"]["maxItems"] == 5
    relabel = schema["paths"]["/review/api/relabel"]["post"]
    assert set(relabel["responses"]) == {"200", "400", "403", "404", "409"}
    ref = relabel["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    to = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]["to"]
    assert to["enum"] == svc.classifier.classes
    assert "503" in schema["paths"]["/healthz"]["get"]["responses"]


def test_healthz_answers_503_when_stuck(guarded, monkeypatch):
    svc, _ = guarded
    client = TestClient(svc.app, base_url="http://127.0.0.1:8123")
    stuck = {"status": "stuck", "waiting_images": 3, "waiting_requests": 1,
             "oldest_wait_s": 99.0, "model_call_s": 99.0}
    monkeypatch.setattr(svc.batcher, "health", lambda: stuck)
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json() == stuck


# --- a live server: Schemathesis, slow clients, fairness ----------------------------------


@pytest.fixture(scope="module")
def live(trained_run, tmp_path_factory):
    from graftkit.serve.server import Service

    data = tmp_path_factory.mktemp("live") / "data"
    shutil.copytree(trained_run / "data", data)
    svc = Service(trained_run / "run", data=str(data), max_files=1000, header_timeout=1.0,
                  body_timeout=1.0, max_connections=24)
    svc.review.wait()
    base = svc.start()
    yield svc, base, data
    svc.stop()
    time.sleep(0.3)
    svc.batcher.close()


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_schemathesis_finds_nothing(live, with_token, tmp_path):
    """`st run` with every check against the live server, with and without the token."""
    svc, base, data = live
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed (make test installs it)")
    header = f"X-Graft-Token: {svc.token}" if with_token else "X-Other: none"
    before = digests(data)
    proc = subprocess.run(
        [str(st), "--config-file", str(HERE / "data" / "schemathesis.toml"), "run",
         f"{base}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "7",
         # POST /review/api/refit starts a real fit and swaps the served run: its own test
         # (tests/test_data_loop.py) covers it, the fuzzer must not start one per example
         "--exclude-path", "/review/api/refit",
         "--header", header, "--workers", "1", "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    svc.review.restore_since(None)  # the fuzzer's moves, undone through the journal
    assert digests(data) == before


def test_slow_and_idle_clients_are_cut_off(live):
    svc, base, _ = live
    port = int(base.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(40):  # more than max_connections (24), each with half its headers
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            held.append(s)
        time.sleep(0.2)
        closed_at_once = sum(_closed(s, 0.05) for s in held)
        assert closed_at_once >= 40 - 24  # over the cap: refused at once
        time.sleep(1.5)  # past the header deadline (1 s): every half-sent request is cut off
        assert all(_closed(s, 0.5) for s in held)
        # a body that stops arriving gets a 408 after the body timeout (1 s)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
                  b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                  + b"x" * 1100)
        started = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 10
        s.close()
        # and the server still answers
        import urllib.request

        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
    finally:
        for s in held:
            s.close()


def _closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    parts = [b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" +
             name.encode() + b"\"\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n"
             for name, data in files]
    return b"".join(parts) + b"--b0undary--\r\n", "multipart/form-data; boundary=b0undary"


def test_a_one_image_request_is_answered_while_a_large_one_is_served(live):
    import urllib.request

    svc, base, _ = live
    many = [(f"{i}.png", png_bytes((i % 250, 20, 30), size=24)) for i in range(1000)]
    one = [("one.png", png_bytes((200, 30, 30)))]
    finished: dict[str, float] = {}

    def post(name, files):
        body, kind = multipart(files)
        ask = urllib.request.Request(base + "/predict", data=body, method="POST",
                                     headers={"Content-Type": kind})
        with urllib.request.urlopen(ask, timeout=300) as r:
            assert len(json.load(r)["predictions"]) == len(files)
        finished[name] = time.monotonic()

    calls_before = svc.batcher.batches
    big = threading.Thread(target=post, args=("big", many))
    big.start()
    deadline = time.monotonic() + 120
    while svc.batcher.batches == calls_before and time.monotonic() < deadline:
        time.sleep(0.01)  # the large request is being scored now
    sent = time.monotonic()
    post("one", one)
    big.join(300)
    assert finished["one"] < finished["big"]
    print(f"one image answered in {finished['one'] - sent:.2f} s while 1,000 were served "
          f"(they took {finished['big'] - sent:.2f} s more)")


# --- end to end, in subprocesses: memory under large uploads, crash and restore -------------


def _claims(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (never decodable)."""
    from tests.test_serve import bomb_png

    return bomb_png(width, height)


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_memory_stays_bounded_under_bursts_of_large_images(trained_run, tmp_path):
    """Eight 24-megapixel photos at once, three times, plus oversized ones: the server's peak
    memory stays under 2.5 GB and does not grow from burst to burst."""
    import concurrent.futures
    import urllib.request

    allowed = io.BytesIO()
    Image.new("RGB", (6000, 4000), (120, 30, 60)).save(allowed, "PNG")  # 24 MP, ~70 KB
    over = io.BytesIO()
    Image.new("RGB", (9000, 9000), (20, 90, 60)).save(over, "PNG")  # 81 MP: refused unread
    proc = subprocess.Popen([sys.executable, "-m", "graftkit.cli", "serve",
                             str(trained_run / "run"), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = None
        for line in proc.stdout:
            if "try page" in line:
                base = line.split()[2].rstrip("/")
            if line.startswith("Ctrl-C"):
                break
        assert base, proc.stderr.read()

        def post(name: str, data: bytes) -> int:
            body, kind = multipart([(name, data)])
            ask = urllib.request.Request(base + "/predict", data=body, method="POST",
                                         headers={"Content-Type": kind})
            try:
                with urllib.request.urlopen(ask, timeout=300) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        idle = _status(proc.pid, "VmRSS")
        after = []
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: post(f"over{i}.png", over.getvalue()), range(8)))
            assert codes == [400] * 8
            codes = list(pool.map(lambda i: post(f"bomb{i}.png", _claims(10_000, 10_000)),
                                  range(4)))
            assert codes == [400] * 4  # 100 MP: Pillow would warn; refused, and no warning
            for _ in range(3):
                codes = list(pool.map(lambda i: post(f"big{i}.png", allowed.getvalue()), range(8)))
                assert codes == [200] * 8
                after.append(_status(proc.pid, "VmRSS"))
        peak = _status(proc.pid, "VmHWM")
        print(f"idle {idle / 2**30:.2f} GB, after each burst "
              f"{', '.join(f'{a / 2**30:.2f}' for a in after)} GB, peak {peak / 2**30:.2f} GB")
        assert peak < 2.5 * 2**30
        assert after[2] - after[0] < 200 * 2**20  # flat across bursts
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert "DecompressionBombWarning" not in err and "decompression bomb" not in err.lower()
    assert "Traceback" not in err


@pytest.mark.slow
def test_crash_and_restore_brings_every_image_home(trained_run, tmp_path):
    """scripts/serve_crash_restore.py: SIGKILL mid-burst, a cut journal line, two servers with
    conflicting actions, then graft review undo --all: every image home, byte for byte."""
    script = HERE.parent / "scripts" / "serve_crash_restore.py"
    proc = subprocess.run([sys.executable, str(script), str(trained_run / "run"),
                           str(trained_run / "data")], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "every image back in its place, byte for byte" in proc.stdout


def test_inbox_moves_are_journalled_and_undone_from_anywhere(tmp_path):
    """An inbox image accepted into a class folder: the entry records the inbox, so an undo
    by a journal that knows nothing of it (graft review undo) puts the image back there."""
    from graftkit.serve.journal import INBOX, free_name

    root = folder(tmp_path / "data")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "new.png").write_bytes(b"new image")
    (root / "b" / "new.png").write_bytes(b"a namesake already in b")
    j = Journal(root, inbox=inbox)
    entry = j.move(f"{INBOX}/new.png", "accept", f"{INBOX}/new.png",
                   free_name(root / "b" / "new.png"))
    assert entry["to"] == "b/new-1.png" and entry["inbox"] == str(inbox)
    assert not (inbox / "new.png").exists()
    assert (root / "b" / "new-1.png").read_bytes() == b"new image"
    assert (root / "b" / "new.png").read_bytes() == b"a namesake already in b"
    plain = Journal(root)  # the CLI's: no inbox given
    assert plain.history().where(f"{INBOX}/new.png") == "b/new-1.png"
    back = plain.undo(entry["id"])
    assert back["to"] == f"{INBOX}/new.png" and (inbox / "new.png").read_bytes() == b"new image"
    assert not (root / "b" / "new-1.png").exists()

    # restore since: every inbox image goes home
    again = j.move(f"{INBOX}/new.png", "accept", f"{INBOX}/new.png", root / "a" / "fresh.png")
    done, problems = plain.restore_since(None)
    assert not problems and (inbox / "new.png").is_file() and not (root / "a" / "fresh.png").exists()
    assert again["id"] in done[0]["undoes"]

    # a move cut short between the link and the unlink is settled on the next start
    os.link(inbox / "new.png", root / "a" / "cut.png")
    j.append({"id": "cut", "time": "2026-12-05T10:00:00+00:00", "action": "accept",
              "key": f"{INBOX}/new.png", "from": f"{INBOX}/new.png", "to": "a/cut.png",
              "inbox": str(inbox)})
    assert Journal(root).recover() == 1
    assert not (inbox / "new.png").exists() and (root / "a" / "cut.png").is_file()
    Journal(root).restore(f"{INBOX}/new.png")
    assert (inbox / "new.png").read_bytes() == b"new image"


def test_an_inbox_path_needs_a_recorded_inbox(tmp_path):
    from graftkit.serve.journal import INBOX

    root = folder(tmp_path / "data")
    with pytest.raises(JournalError, match="no inbox folder"):
        Journal(root).move(f"{INBOX}/x.png", "accept", f"{INBOX}/x.png", root / "a" / "x.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    j = Journal(root, inbox=tmp_path / "inbox")
    with pytest.raises(JournalError, match="outside the data folder"):
        j.move("a/x0.png", "relabel", "a/x0.png", outside / "y.png")

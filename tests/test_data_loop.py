"""The data loop on a served run: likely wrong labels on the review page (accept one, accept
all above a probability, undo), new images in the inbox, graft suggest, and the refit."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="graft serve needs the serve extra (make test installs it)")
from fastapi.testclient import TestClient  # noqa: E402

from graftkit.labels.issues import FILE, LabelIssue, write_csv  # noqa: E402
from graftkit.serve.journal import JOURNAL, SET_ASIDE  # noqa: E402

pytestmark = pytest.mark.integration

# (image, given, suggested, p_given, p_suggested): made-up findings over the shared run's data
ISSUES = [("class_0/img_001.png", "class_0", "class_1", 0.02, 0.97),
          ("class_1/img_002.png", "class_1", "class_2", 0.05, 0.93),
          ("class_2/img_003.png", "class_2", "class_0", 0.20, 0.61),
          ("class_0/img_004.png", "class_0", "class_2", 0.30, 0.42)]


def contents(data: Path) -> dict[str, str]:
    """Every image file's digest: what must survive any sequence of moves and undos."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in data.rglob("*.png")}


def where(data: Path, name: str, digest: str) -> str:
    found = [p for p in data.rglob("*.png") if hashlib.sha256(p.read_bytes()).hexdigest() == digest]
    assert len(found) == 1, (name, found)
    return found[0].relative_to(data).as_posix()


def journal_complete(data: Path) -> None:
    """Every move in the journal is settled (done or failed), and every line is readable."""
    lines = [json.loads(line) for line in (data / JOURNAL).read_text().splitlines()]
    moves = {e["id"] for e in lines if "action" in e}
    settled = {e["id"] for e in lines if "action" not in e and (e.get("done") or e.get("failed"))}
    assert moves and moves == settled


@pytest.fixture
def issues_run(trained_run, tmp_path):
    """A copy of the shared run with made-up label issues, and a copy of its data to move."""
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(trained_run / "run", run)
    shutil.copytree(trained_run / "data", data)
    recorded = trained_run / "data"  # where the run's own files point
    write_csv(run / FILE, [LabelIssue(rank, str(recorded / path), "train", given, suggested,
                                      p_given, p_sugg)
                           for rank, (path, given, suggested, p_given, p_sugg)
                           in enumerate(ISSUES, 1)])
    return run, data


@pytest.fixture
def issues_service(issues_run):
    from graftkit.serve.server import Service

    run, data = issues_run
    service = Service(run, data=str(data))
    service.review.wait()
    yield service, data
    service.batcher.close()


def test_review_lists_likely_wrong_labels_and_accepts_them(issues_service):
    service, data = issues_service
    client = TestClient(service.app, base_url="http://127.0.0.1")
    auth = {"X-Graft-Token": service.token}
    before = contents(data)
    groups = {g["id"]: g for g in client.get("/review/api/items", headers=auth).json()["groups"]}
    assert list(groups)[0] == "label_issues" and groups["label_issues"]["title"] == \
        "Likely wrong labels"
    items = groups["label_issues"]["items"]
    assert [i["path"] for i in items[:4]] == [path for path, *_ in ISSUES]  # in rank order
    assert [(i["suggested"], i["rank"]) for i in items[:4]] == [(s, r) for r, (_, _, s, _, _)
                                                               in enumerate(ISSUES, 1)]
    assert "#1: labelled class_0 (p 0.02), looks like class_1 (p 0.97)" in items[0]["why"][0]
    review = service.review
    assert review.acceptable(0.9) == ["class_0/img_001.png", "class_1/img_002.png"]

    # one by hand first: accept-all leaves an image the user moved alone
    r = client.post("/review/api/relabel", json={"key": "class_1/img_002.png", "to": "class_0"},
                    headers=auth)
    assert r.status_code == 200, r.text
    time.sleep(1.1)  # the journal's times are in seconds
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    assert review.acceptable(0.5) == ["class_0/img_001.png", "class_2/img_003.png"]
    r = client.post("/review/api/accept", json={"min_p": 0.5}, headers=auth)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["accepted"] == 2 and not done["problems"]
    assert [(a["from"], a["to"]) for a in done["actions"]] == [  # beside a file of that name
        ("class_0/img_001.png", "class_1/img_001-1.png"),
        ("class_2/img_003.png", "class_0/img_003-1.png")]
    assert (data / "class_1" / "img_001-1.png").is_file()
    assert not (data / "class_0" / "img_001.png").exists()
    assert review.acceptable(0.0) == ["class_0/img_004.png"]  # the rest: moved, or accepted
    now = {i["key"]: i for i in review.summary()["groups"][0]["items"]}
    assert now["class_0/img_001.png"]["status"] == "relabelled class_0 -> class_1"
    for bad in ({"min_p": 1.5}, {"min_p": "high"}, {"min_p": True}, {}):
        r = client.post("/review/api/accept", json=bad, headers=auth)
        assert r.status_code == 400 and "min_p" in r.json()["detail"]
    assert client.post("/review/api/accept", json={"min_p": 0.5}).status_code == 403

    # undo: every move since before the accept-all, then the one by hand; nothing lost
    r = client.post("/review/api/restore-all", json={"since": started}, headers=auth)
    assert r.json()["restored"] == 2
    r = client.post("/review/api/restore-all", json={"since": None}, headers=auth)
    assert r.json()["restored"] == 1
    assert contents(data) == before
    for digest, name in before.items():  # every file back in its own place
        assert where(data, name, digest).endswith("/" + name)
    for path, *_ in ISSUES:
        assert (data / path).is_file()
    journal_complete(data)


def test_conflicting_copies_join_the_likely_wrong_labels(trained_run, tmp_path):
    from graftkit.serve.review import Review
    from graftkit.serve.server import Service

    data = tmp_path / "data"
    shutil.copytree(trained_run / "data", data)
    shutil.copy(data / "class_0" / "img_000.png", data / "class_2" / "copy.png")
    service = Service(trained_run / "run", data=str(data))
    try:
        review: Review = service.review
        review.wait()
        group = review.summary()["groups"][0]
        assert group["id"] == "label_issues"
        paths = {i["path"]: i for i in group["items"]}
        assert {"class_0/img_000.png", "class_2/copy.png"} <= set(paths)
        assert paths["class_2/copy.png"]["suggested"] is None  # a copy says "one is wrong", not which
        assert review.acceptable(0.0) == []
    finally:
        service.batcher.close()


@pytest.mark.slow
def test_likely_wrong_labels_in_headless_chromium(issues_run):
    """Accept one suggestion from its card, then all above a probability (the count shown
    before anything moves), then undo everything: every file back, the journal complete."""
    from tests.test_serve import browser_or_skip, until

    sync_playwright = browser_or_skip()
    from graftkit.serve.server import Service

    run, data = issues_run
    before = contents(data)
    service = Service(run, data=str(data))
    base = service.start()
    try:
        with sync_playwright() as p:
            from tests.test_report import CHROMIUM

            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("dialog", lambda d: d.accept())
            page.goto(f"{base}/review?token={service.token}")
            page.wait_for_selector("#label_issues .card .relabel", timeout=120_000)
            cards = page.locator("#label_issues .card")
            first = cards.first
            assert first.get_attribute("data-path") == "class_0/img_001.png"
            assert first.locator("select").input_value() == "class_1"  # the suggestion
            assert first.locator(".relabel").inner_text() == "Accept: class_1"
            assert "suggested: class_1 97%" in first.inner_text()
            button = page.locator("#accept-all")
            assert button.inner_text() == "Accept the 2 suggestions with p \u2265 0.90"
            first.locator(".relabel").click()
            until(page, "() => document.getElementById('message').textContent"
                        ".startsWith('relabelled: class_0/img_001.png')")
            assert (data / "class_1" / "img_001-1.png").is_file()
            until(page, "() => document.getElementById('accept-all').dataset.count === '1'")
            page.fill("#accept-threshold", "0.5")
            until(page, "() => document.getElementById('accept-all').textContent === "
                        "'Accept the 2 suggestions with p \u2265 0.50'")
            assert (data / "class_1" / "img_002.png").is_file()  # nothing moved yet
            page.click("#accept-all")
            until(page, "() => document.getElementById('message').textContent"
                        ".startsWith('accepted 2 suggestion(s)')")
            assert (data / "class_2" / "img_002.png").is_file()
            assert (data / "class_0" / "img_003-1.png").is_file()
            until(page, "() => document.getElementById('accept-all').dataset.count === '0'")
            assert page.locator("#accept-threshold").input_value() == "0.5"  # kept on reload
            page.click("#restore-all")
            until(page, "() => document.getElementById('message').textContent"
                        ".startsWith('restored 3 image(s)')")
            browser.close()
    finally:
        service.stop()
        time.sleep(0.5)
        service.batcher.close()
    assert contents(data) == before
    for path, *_ in ISSUES:
        assert (data / path).is_file()
    journal_complete(data)


# --- the inbox -----------------------------------------------------------------------------


def inbox_folders(trained_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the shared run's data and an inbox of new images: four of each class (copies
    under new names), an unreadable file and a hidden folder."""
    data, box = tmp_path / "data", tmp_path / "inbox"
    shutil.copytree(trained_run / "data", data)
    box.mkdir()
    for c in range(3):
        for i in range(4):
            shutil.copy(trained_run / "data" / f"class_{c}" / f"img_{i:03d}.png",
                        box / f"new_{c}_{i}.png")
    (box / "broken.jpg").write_bytes(b"not an image")
    (box / ".hidden").mkdir()
    shutil.copy(box / "new_0_0.png", box / ".hidden" / "x.png")
    return data, box


@pytest.fixture
def inbox_service(trained_run, tmp_path):
    from graftkit.serve.server import Service

    data, box = inbox_folders(trained_run, tmp_path)
    service = Service(trained_run / "run", data=str(data), inbox=str(box))
    service.review.wait()
    service.inbox.wait()
    yield service, data, box
    service.batcher.close()


def test_inbox_suggests_files_and_undoes(inbox_service):
    service, data, box = inbox_service
    client = TestClient(service.app, base_url="http://127.0.0.1")
    auth = {"X-Graft-Token": service.token}
    before = {**contents(data), **contents(box)}
    s = client.get("/review/api/inbox/items", headers=auth).json()
    assert s["state"] == "ready" and s["can_move"], s
    items = s["items"] + s["unknown"]
    assert sorted(i["path"] for i in items) == sorted(f"new_{c}_{i}.png" for c in range(3)
                                                      for i in range(4))
    assert [i["order"] for i in items] == list(range(1, 13))  # known ones first, in order
    assert any("broken.jpg" in x for x in s["skipped"])
    want = {p.path: p for p in service.classifier.predict(sorted(box.glob("*.png")))}
    for i in items:
        assert i["suggested"] == want[str(box / i["path"])].label
        assert i["known"] == want[str(box / i["path"])].known
    assert client.get("/review/api/inbox/items").status_code == 403

    # accept one under its suggestion: into the class folder of the data
    first = s["items"][0]
    r = client.post("/review/api/inbox/accept", json={"key": first["key"], "to": first["suggested"]},
                    headers=auth)
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["action"] == "accept" and moved["to"] == f"{first['suggested']}/{first['path']}"
    assert (data / moved["to"]).is_file() and not (box / first["path"]).exists()
    r = client.get("/review/api/inbox/image", params={"key": first["key"]}, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"  # where it is now
    # set one aside, accept all above a threshold
    second = s["items"][1]
    r = client.post("/review/api/inbox/set-aside", json={"key": second["key"]}, headers=auth)
    assert r.status_code == 200 and (box / SET_ASIDE / second["path"]).is_file()
    review_actions = client.get("/review/api/items", headers=auth).json()["actions"]
    assert {a["id"] for a in review_actions} >= {moved["id"], r.json()["id"]}
    want_n = len(service.inbox.acceptable(0.5))
    assert want_n == sum(i["known"] and i["probability"] >= 0.5 for i in s["items"][2:])
    r = client.post("/review/api/inbox/accept-all", json={"min_p": 0.5}, headers=auth)
    assert r.status_code == 200 and r.json()["accepted"] == want_n
    now = client.get("/review/api/inbox/items", headers=auth).json()
    assert now["accepted"] == want_n + 1
    for bad in ({"key": "@inbox/../x.png", "to": "class_0"}, {"key": "@inbox/none.png", "to": "class_0"},
                {"key": first["key"], "to": "class_9"}):
        r = client.post("/review/api/inbox/accept", json=bad, headers=auth)
        assert r.status_code in (400, 404), (bad, r.text)

    # undo the first through the review API: back into the inbox
    r = client.post("/review/api/undo", json={"id": moved["id"]}, headers=auth)
    assert r.status_code == 200 and (box / first["path"]).is_file()
    r = client.post("/review/api/restore-all", json={"since": None}, headers=auth)
    assert r.status_code == 200
    assert {**contents(data), **contents(box)} == before
    assert not list((box / SET_ASIDE).rglob("*.png"))
    journal_complete(data)


def test_serve_inbox_errors(trained_run, tmp_path, capsys):
    from graftkit.cli import main

    assert main(["serve", str(trained_run / "run"), "--inbox", str(tmp_path / "nope")]) == 3
    assert "--inbox" in capsys.readouterr().err


# --- the refit ---------------------------------------------------------------------------


def test_refit_writes_the_next_free_run_folder_or_resumes_an_unfinished_one(tmp_path):
    from graftkit.outputs.run import next_run_dir as _next_free

    assert _next_free(tmp_path / "photos") == tmp_path / "photos-2"
    (tmp_path / "photos-2").mkdir()  # unfinished (Ctrl-C): the same command resumes it
    assert _next_free(tmp_path / "photos") == tmp_path / "photos-2"
    (tmp_path / "photos-2" / "metrics.json").write_text("{}")
    assert _next_free(tmp_path / "photos") == tmp_path / "photos-3"
    assert _next_free(tmp_path / "photos-2") == tmp_path / "photos-3"
    assert _next_free(tmp_path / "run-v1") == tmp_path / "run-v1-2"


def test_refit_says_what_changed_and_reads_the_rest_from_the_cache(tmp_path, capsys,
                                                                   monkeypatch):
    """A relabelled image keeps its cached frozen outputs: only the new one is computed."""
    from graftkit.cli import main
    from tests.conftest import make_folder

    monkeypatch.setenv("GRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", classes=3, per_class=10)
    assert main(["fit", str(data), "--out", str(tmp_path / "run"), "--image-size", "32",
                 "--mode", "head", "--head-epochs", "3", "--batch-size", "8",
                 "--no-augment", "--label-folds", "0"]) == 0
    capsys.readouterr()
    shutil.move(data / "class_0" / "img_002.png", data / "class_1" / "from_0.png")
    shutil.copy(data / "class_2" / "img_000.png", data / "class_2" / "img_000_copy.png")
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 10)).save(data / "class_2" / "new.png")
    assert main(["refit", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"refit of {tmp_path / 'run'}: {data} -> {tmp_path / 'run-2'}" in out
    assert f"since {tmp_path / 'run'}: 1 new image, 1 relabelled, 0 gone" in out, out[:1500]
    m = json.loads((tmp_path / "run-2" / "metrics.json").read_text())
    assert m["options"]["head_epochs"] == 3 and m["options"]["augment"] == {}  # --no-augment kept
    assert m["frozen_outputs"]["computed"] == 1  # the new image: the relabelled one is cached
    split = json.loads((tmp_path / "run-2" / "split.json").read_text())
    assert len(split["val_sha256"]) == len(split["val"])
    # both models on the validation images both runs had, paired by content
    before = json.loads((tmp_path / "run" / "split.json").read_text())["val_sha256"]
    compared = m["previous_run"]
    assert compared["run"] == str(tmp_path / "run")
    assert compared["images"] == len(set(before) & set(split["val_sha256"])) > 0
    assert f"against the last run {compared['val_accuracy']:.4f} here" in out
    report = (tmp_path / "run-2" / "report.html").read_text()
    assert f"<p class=muted id=previous-run>against the last run: {compared['val_accuracy']:.4f}" \
        in report
    assert main(["refit", str(tmp_path / "nope")]) == 5


def test_refit_from_the_page_serves_the_new_run(issues_run):
    """POST /review/api/refit runs graft refit in a child process; the server then serves
    the new run (predictions, the review of its own findings) without a restart."""
    from graftkit.serve.server import Service

    run, data = issues_run
    (data / "class_1" / "img_009.png").rename(data / "class_2" / "moved.png")  # a relabel
    service = Service(run, data=str(data))
    client = TestClient(service.app, base_url="http://127.0.0.1")
    auth = {"X-Graft-Token": service.token}
    try:
        service.review.wait()
        idle = client.get("/review/api/refit", headers=auth).json()
        assert idle["state"] == "idle" and idle["command"].startswith(f"graft refit {run}")
        assert client.post("/review/api/refit").status_code == 403
        r = client.post("/review/api/refit", headers=auth)
        assert r.status_code == 200 and r.json()["state"] == "running"
        assert r.json()["out"] == f"{run}-2"
        assert client.post("/review/api/refit", headers=auth).status_code == 409  # one at a time
        service.refit.wait(600)
        status = client.get("/review/api/refit", headers=auth).json()
        assert status["state"] == "done", status
        assert status["message"].startswith(f"now serving {run}-2: ")
        assert " here, " in status["message"] and f" for {run}, on the same " in status["message"]
        assert any("1 relabelled" in line for line in status["log"]), status["log"]
        assert client.get("/info").json()["run"] == str(Path(f"{run}-2").resolve())
        from tests.test_serve import png_bytes

        r = client.post("/predict", files={"file": ("a.png", png_bytes())})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("class_")
        service.review.wait()
        assert client.get("/review/api/items", headers=auth).json()["next"].startswith(
            f"graft refit {run}-2")
    finally:
        service.stop()
        service.batcher.close()


@pytest.mark.slow
def test_inbox_in_headless_chromium(trained_run, tmp_path):
    """Accept one suggestion, accept all above a probability (the count first), undo: every
    file back in the inbox, the journal settled."""
    from tests.test_report import CHROMIUM
    from tests.test_serve import browser_or_skip, until

    sync_playwright = browser_or_skip()
    from graftkit.serve.server import Service

    data, box = inbox_folders(trained_run, tmp_path)
    before = {**contents(data), **contents(box)}
    service = Service(trained_run / "run", data=str(data), inbox=str(box))
    base = service.start()
    try:
        service.inbox.wait()
        summary = service.inbox.summary()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("dialog", lambda d: d.accept())
            page.goto(f"{base}/inbox?token={service.token}")
            page.wait_for_selector("#known-grid .card .accept", timeout=120_000)
            assert page.url == f"{base}/inbox"
            cards = page.locator("#known-grid .card")
            assert cards.count() == len(summary["items"])
            first = summary["items"][0]
            card = cards.first
            assert card.get_attribute("data-key") == first["key"]
            assert card.locator("select").input_value() == first["suggested"]
            assert card.locator(".accept").inner_text() == f"Accept: {first['suggested']}"
            for unknown in page.locator("#unknown-grid .card select").all():
                assert unknown.input_value() == ""  # nothing chosen for an unknown image
            card.locator(".accept").click()
            until(page, "() => document.getElementById('message').textContent"
                        ".startsWith('filed: @inbox/')")
            assert (data / first["suggested"] / first["path"]).is_file()
            rest = [i for i in summary["items"][1:] if i["probability"] >= 0.0]
            page.fill("#accept-threshold", "0")
            until(page, f"() => document.getElementById('accept-all').dataset.count === "
                        f"'{len(rest)}'")
            assert not any((data / i["suggested"] / i["path"]).exists() for i in rest)
            page.click("#accept-all")
            until(page, "() => document.getElementById('message').textContent"
                        f".startsWith('filed {len(rest)} image(s)')")
            assert all((data / i["suggested"] / i["path"]).is_file() for i in rest)
            assert page.inner_text("#next-command").startswith("graft refit ")
            page.goto(f"{base}/review")  # the same tab: undo everything from the review page
            page.wait_for_selector("#restore-all", timeout=60_000)
            until(page, "() => !document.getElementById('recent').hidden")
            page.click("#restore-all")
            until(page, "() => document.getElementById('message').textContent"
                        f".startsWith('restored {len(rest) + 1} image(s)')")
            browser.close()
    finally:
        service.stop()
        time.sleep(0.5)
        service.batcher.close()
    assert {**contents(data), **contents(box)} == before
    journal_complete(data)

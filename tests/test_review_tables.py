"""The review page on data kept in a table: label edits of one row, journalled, undone,
settled after a crash; the rest of the table kept byte for byte. No model: a hand-made run
folder with the files the review reads (label_issues.csv, predictions.csv)."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graftkit.data.table_edit import row_labels, set_row_labels
from graftkit.outputs.record import RunRecord
from graftkit.serve.journal import JOURNAL, Journal, JournalError
from graftkit.serve.review import Review


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)


# --- the table file ------------------------------------------------------------------------


def test_one_row_changes_and_every_other_byte_stays(tmp_path):
    table = tmp_path / "train.csv"
    text = ("\ufeffpath,labels,note\r\n"
            "a.png,cars trees,\"keep, this\"\r\n"
            "b.png,trees,\"two\r\nlines\"\r\n"
            "c.png,cars,x")  # no line ending on the last row
    table.write_bytes(text.encode("utf-8"))
    set_row_labels(table, "b.png", ["trees", "buildings"], " ")
    want = text.replace("b.png,trees,", "b.png,buildings trees,")
    assert table.read_bytes().decode("utf-8") == want
    set_row_labels(table, "c.png", ["cars", "pavement"], " ")
    assert table.read_bytes().decode("utf-8").endswith("c.png,cars pavement,x")
    assert row_labels(table, "a.png", " ") == ["cars", "trees"]
    assert row_labels(table, "nowhere.png", " ") is None
    tsv = tmp_path / "l.tsv"
    tsv.write_text("path\tlabel\nx/a.png\tants\nx/b.png\tbees\n")
    set_row_labels(tsv, "x/a.png", ["bees"], None)
    assert tsv.read_text() == "path\tlabel\nx/a.png\tbees\nx/b.png\tbees\n"
    from graftkit.errors import DataError

    with pytest.raises(DataError, match="no row for gone.png"):
        set_row_labels(tsv, "gone.png", ["ants"], None)


def test_the_table_keeps_its_permissions_under_any_umask(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,label\na.png,ants\n")
    os.chmod(table, 0o664)
    old = os.umask(0o077)
    try:
        set_row_labels(table, "a.png", ["bees"], None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(table.stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temp file left


# --- the journal ---------------------------------------------------------------------------


def _journal_table(tmp_path) -> tuple[Journal, Path]:
    table = tmp_path / "train.csv"
    table.write_text("path,labels\nimg/a.png,cars\nimg/b.png,trees\n")
    return Journal(tmp_path), table


def test_edits_undo_all_the_way_back(tmp_path):
    journal, table = _journal_table(tmp_path)
    with journal.locked():
        first = journal.edit("img/a.png", "train.csv", "img/a.png", " ", ["cars"],
                             ["cars", "trees"])
        journal.edit("img/a.png", "train.csv", "img/a.png", " ", ["cars", "trees"], ["trees"])
    assert row_labels(table, "img/a.png", " ") == ["trees"]
    stack = journal.history().stacks["img/a.png"]
    assert [a["after"] for a in stack] == [["cars", "trees"], ["trees"]]
    back = journal.undo(first["id"])  # the first edit and the later one with it
    assert back["undoes"] == [first["id"], stack[1]["id"]] and back["after"] == ["cars"]
    assert row_labels(table, "img/a.png", " ") == ["cars"]
    assert not journal.history().stacks
    # restore every change since the start, over two images
    with journal.locked():
        journal.edit("img/a.png", "train.csv", "img/a.png", " ", ["cars"], [])
        journal.edit("img/b.png", "train.csv", "img/b.png", " ", ["trees"], ["cars"])
    done, problems = journal.restore_since(None)
    assert len(done) == 2 and problems == []
    assert table.read_text() == "path,labels\nimg/a.png,cars\nimg/b.png,trees\n"


def test_an_edit_by_hand_is_never_written_over(tmp_path):
    journal, table = _journal_table(tmp_path)
    with journal.locked():
        entry = journal.edit("img/a.png", "train.csv", "img/a.png", " ", ["cars"], ["trees"])
    table.write_text("path,labels\nimg/a.png,pavement\nimg/b.png,trees\n")  # by hand
    with pytest.raises(JournalError, match="changed by hand"):
        journal.undo(entry["id"])
    assert row_labels(table, "img/a.png", " ") == ["pavement"]
    with pytest.raises(JournalError, match="invalid path"), journal.locked():
        journal.edit("x", "../train.csv", "img/a.png", " ", ["cars"], [])
    away = tmp_path.parent / f"{tmp_path.name}-away.csv"
    away.write_text("path,labels\nimg/a.png,cars\n")
    (tmp_path / "link.csv").symlink_to(away)
    with pytest.raises(JournalError, match="outside the data folder"), journal.locked():
        journal.edit("img/a.png", "link.csv", "img/a.png", " ", ["cars"], [])
    assert away.read_text() == "path,labels\nimg/a.png,cars\n"


@pytest.mark.parametrize("written", [True, False])
def test_an_edit_cut_short_is_settled_on_the_next_start(tmp_path, written):
    """A crash after the journal line: the table is the old one or the new one (one rename),
    and the next start marks the edit done or failed by what the table holds."""
    journal, table = _journal_table(tmp_path)
    entry = {"id": "0123456789ab", "time": "2026-12-05T10:00:00+00:00", "action": "edit",
             "key": "img/a.png", "from": "img/a.png", "to": "img/a.png", "table": "train.csv",
             "row": "img/a.png", "sep": " ", "before": ["cars"], "after": ["trees"]}
    journal.append(entry)
    if written:
        set_row_labels(table, "img/a.png", ["trees"], " ")
    (tmp_path / ".train-0123456789ab.csv").write_text("half")  # the temp file of the write
    assert journal.recover() == 1
    lines = [json.loads(x) for x in (tmp_path / JOURNAL).read_text().splitlines()]
    assert lines[-1].get("done") is (True if written else None)
    assert not (tmp_path / ".train-0123456789ab.csv").exists()
    assert bool(journal.history().stacks) is written


def test_the_command_line_lists_and_undoes_edits(tmp_path, capsys):
    from graftkit.cli import main

    journal, table = _journal_table(tmp_path)
    with journal.locked():
        journal.edit("img/a.png", "train.csv", "img/a.png", " ", ["cars"], ["cars", "trees"])
    assert main(["review", "log", str(table)]) == 0
    assert "img/a.png: cars -> cars trees in train.csv" in capsys.readouterr().out
    assert main(["review", "undo", str(tmp_path), "--all"]) == 0
    assert "1 image(s) put back" in capsys.readouterr().out
    assert row_labels(table, "img/a.png", " ") == ["cars"]


# --- the review ----------------------------------------------------------------------------


def _run(tmp_path: Path, data: Path, task: str, classes: list[str], **options) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    record = {"task": task, "classes": classes, "data": str(data),
              "options": {"val_split": 0.5, "seed": 1, **options}}
    (run / "metrics.json").write_text(json.dumps(record))
    return run


def _review(run: Path) -> Review:
    record = RunRecord.from_json(json.loads((run / "metrics.json").read_text()))
    review = Review(run, record.classes, record, None)
    review.load()
    assert review.state == "ready", review.message
    return review


def test_relabel_edits_a_single_label_table(tmp_path):
    data = tmp_path / "data"
    _images(data / "img", [f"{i}.png" for i in range(8)])
    table = data / "labels.csv"
    text = "".join(f"img/{i}.png,{'ants' if i < 4 else 'bees'}\n" for i in range(8))
    table.write_text(text)
    run = _run(tmp_path, table, "single_label", ["ants", "bees"])
    with open(run / "label_issues.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "given", "suggested", "p_given", "p_suggested", "rank"])
        w.writerow([str(data / "img/1.png"), "train", "ants", "bees", "0.05", "0.95", "1"])
        w.writerow([str(data / "img/6.png"), "val", "bees", "ants", "0.3", "0.7", "2"])
    review = _review(run)
    s = review.summary()
    assert s["mode"] == "table" and s["can_move"] and s["tables"] == {"train": "labels.csv"}
    item = s["groups"][0]["items"][0]
    assert item["key"] == "img/1.png" and item["editable"] and item["labels"] == ["ants"]
    done = review.relabel("img/1.png", "bees")
    assert done["action"] == "edit" and done["table"] == "labels.csv"
    assert table.read_text() == text.replace("img/1.png,ants", "img/1.png,bees")
    assert review.summary()["groups"][0]["items"][0]["status"] == "edited: ants -> bees"
    with pytest.raises(JournalError, match="delete its row"):
        review.set_aside("img/6.png")
    assert review.accept(0.6)["accepted"] == 1  # the image edited by hand above is left alone
    assert row_labels(table, "img/6.png", None) == ["ants"]
    assert review.restore_since(None)["restored"] == 2
    assert table.read_text() == text
    assert list((review.folder / "img").iterdir())  # nothing moved, nothing deleted
    assert len(list((review.folder / "img").iterdir())) == 8


def test_labels_added_and_taken_away_in_a_multi_label_table(tmp_path):
    data = tmp_path / "aerial"
    _images(data / "images", [f"{i}.png" for i in range(8)])
    elsewhere = tmp_path / "elsewhere"
    _images(elsewhere, ["far.png"])
    train = "path,labels\n" + "".join(f"images/{i}.png,cars trees\n" for i in range(4))
    val = "path,labels\n" + "".join(f"images/{i}.png,trees\n" for i in range(4, 8)) + \
        f"{elsewhere / 'far.png'},cars\n"
    (data / "train.csv").write_text(train)
    (data / "val.csv").write_text(val)
    run = _run(tmp_path, data, "multi_label", ["cars", "trees"], label_sep=" ")
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "predicted", "loss", "ood_score", "known", "p_cars",
                    "p_trees"])
        w.writerow([str(data / "images/5.png"), "trees", "cars trees", "2.5", "0", "true",
                    "0.9", "0.9"])
        w.writerow([str(data / "images/6.png"), "trees", "trees", "0.1", "0", "true", "0.1",
                    "0.9"])
        w.writerow([str(elsewhere / "far.png"), "cars", "cars trees", "1.0", "0", "true", "0.9",
                    "0.6"])
    review = _review(run)
    s = review.summary()
    assert s["mode"] == "table" and s["multi_label"]
    assert s["tables"] == {"train": "train.csv", "val": "val.csv"}
    top = {i["key"]: i for g in s["groups"] for i in g["items"] if g["id"] == "top_losses"}
    item = top["images/5.png"]
    assert item["added"] == ["cars"] and item["missed"] == [] and item["labels"] == ["trees"]
    assert "added: cars" in item["why"][0]
    review.edit_label("images/5.png", "cars", True)
    assert "images/5.png,cars trees\n" in (data / "val.csv").read_text()
    with pytest.raises(JournalError, match="has the label cars already"):
        review.edit_label("images/5.png", "cars", True)
    with pytest.raises(JournalError, match="add or remove"):
        review.relabel("images/5.png", "cars")
    review.edit_label("images/5.png", "trees", False)
    assert "images/5.png,cars\n" in (data / "val.csv").read_text()
    assert review.summary()["groups"][1]["items"][0]["status"] == "edited: trees -> cars"
    undo = review.undo(review.history().stacks["images/5.png"][0]["id"])
    assert undo["after"] == ["trees"] and (data / "val.csv").read_text() == val
    # a row naming an image outside the data folder is edited all the same
    far = next(k for k in top if k.startswith("elsewhere/"))
    assert top[far]["path"] == str(elsewhere / "far.png") and top[far]["editable"]
    review.edit_label(far, "trees", True)
    assert f"{elsewhere / 'far.png'},cars trees\n" in (data / "val.csv").read_text()
    assert review.file(far) == elsewhere / "far.png"
    assert (data / "train.csv").read_text() == train

"""The review page's model: the run's suspect images, and moves of them that can be undone.

Suspects come from three places: the run's ``label_issues.csv`` (labels that heads which never
trained on the image disagree with, each with a suggested class), its ``predictions.csv``
(validation images the final model got wrong or was least sure of) and a fresh data check
(duplicates, train/val leakage, labels that disagree with a copy's, unreadable files). Only
those files can be shown or moved; the page names an image by its path inside the data root,
which is looked up in that list, never joined to a path blindly.

Moves (relabel: to another class folder of the same split; set aside: into the hidden
``.graft-set-aside`` folder, which scans skip) never delete and never overwrite: the target gets
a free name, and the file is hard-linked there before the old name is removed. Every move goes
through the data folder's journal (``graftkit.serve.journal``), which is the one record of where
each listed image is now and how to put it back.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from graftkit.outputs.record import RunRecord
from graftkit.serve.journal import (
    JOURNAL,
    SET_ASIDE,
    History,
    Journal,
    JournalError,
    checked_path,
    free_name,
    parse_time,
    rel_path,
    within,
)
from graftkit.serve.tables import TableRows, tables_of

TOP_LOSSES = 24  # validation images shown by loss, besides every wrong one
ELSEWHERE = "elsewhere"  # keys of images a table names outside the data folder

# Page groups: which check findings go where, with the group's title.
GROUPS = {
    "label_issues": "Likely wrong labels",
    "top_losses": "Wrong or least sure (validation)",
    "leakage": "Train/val leakage",
    "duplicates": "Duplicates inside a split",
    "unreadable": "Unreadable files",
}
FINDING_GROUP = {"conflicting_labels": "label_issues", "near_duplicate_labels": "label_issues",
                 "leak": "leakage", "near_duplicate": "leakage", "duplicate": "duplicates",
                 "unreadable": "unreadable"}


ReviewError = JournalError  # what the routes answer with its status


@dataclass
class Item:
    """One listed image: where it was when listed (``key``), and why."""

    key: str
    split: str
    label: str
    predicted: str | None = None
    probability: float | None = None
    loss: float | None = None
    reasons: dict[str, list[str]] = field(default_factory=dict)  # group -> why listed there
    suggested: str | None = None  # the label issues' suggestion (label_issues.csv)
    p_suggested: float | None = None
    p_given: float | None = None
    rank: int | None = None
    added: list[str] = field(default_factory=list)  # label sets: the model's, not given
    missed: list[str] = field(default_factory=list)  # given, not the model's


def _where(source: str | None, recorded: str | None) -> tuple[Path | None, str]:
    """The data root to list and move files in, and why files cannot be moved ("" if they can)."""
    from graftkit import defaults
    from graftkit.data.sources import is_tfds

    if not source:
        return None, "this run records no data folder: start graft serve with --data DATA_DIR"
    if is_tfds(source):
        return None, ("the data comes from TensorFlow Datasets (tfds:): its images live in "
                      "graftkit's cache, so the review lists nothing to move")
    path = Path(os.path.abspath(os.path.expanduser(source)))
    if not path.exists():
        hint = "" if source != recorded else " (the run was made elsewhere?)"
        return None, (f"the data folder {path} is not here{hint}: start graft serve with "
                      "--data DATA_DIR")
    if path.is_file():  # a table: its rows are edited, its folder holds the journal
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            return path.parent, (f"{path} (or its folder) is read-only for this user: the "
                                 "review lists the findings only")
        return path.parent, ""
    cache = Path(os.path.abspath(defaults.cache_dir()))
    if path == cache or cache in path.parents:
        return path, "the data lives in graftkit's cache (tfds:): findings only"
    if not os.access(path, os.W_OK | os.X_OK):
        return path, f"{path} is read-only for this user: the review lists the findings only"
    return path, ""


class Background:
    """``load`` run in a thread (``start``), so the server answers while it runs; what went
    wrong is shown on the page (``state``, ``message``) instead of killing the server."""

    state: str
    message: str
    _thread: threading.Thread | None = None

    def load(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self.load, name=f"graft-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Until the background work has finished (tests, scripts)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _loaded(self, work, failure: str) -> None:
        """``work()``, then ready; or failed, with a message a user can read."""
        try:
            self.message = ""
            work()  # may leave a message for a success (e.g. "no image in FOLDER")
            self.state = "ready"
        except Exception as exc:  # noqa: BLE001 - shown on the page instead of killing the server
            from graftkit.errors import GraftError

            self.state = "failed"
            self.message = str(exc) if isinstance(exc, GraftError) else \
                f"{failure}: {type(exc).__name__}: {exc}"


class Review(Background):
    """Suspect images of a run's data and the moves made on them (thread-safe)."""

    def __init__(self, run_dir: str | os.PathLike, classes: list[str], record: RunRecord,
                 data: str | None = None):
        self.run_dir, self.classes, self.record = Path(run_dir), list(classes), record
        self.recorded = record.data  # where predictions.csv's paths point
        self.source = str(data) if data else self.recorded
        self.root, self.why_read_only = _where(self.source, self.recorded)
        self.multi_label = record.task == "multi_label"
        # Data in tables (split -> table): labels are edited in their rows, files never move.
        self.tables = tables_of(self.source, record.options if self.source == self.recorded
                                else {}, self.multi_label) if self.root is not None else {}
        self.sep: str | None = record.options.get("label_sep") or " " if self.multi_label \
            else None
        self.table_rows = TableRows(self.root or Path("."), self.tables, self.sep)
        self.elsewhere: dict[str, str] = {}  # key -> a table's image outside the data folder
        self.state = "checking" if self.root is not None else "unavailable"
        self.message = "" if self.root is not None else self.why_read_only
        self.items: dict[str, Item] = {}
        self.groups: dict[str, list[str]] = {g: [] for g in GROUPS}
        self.split_dirs: tuple[str, ...] = ()
        self.lock = threading.RLock()
        self.journal = Journal(self.root) if self.root and not self.why_read_only else None
        self.recovered = self.journal.recover() if self.journal is not None else 0

    @property
    def can_move(self) -> bool:
        return self.journal is not None and self.state == "ready"

    def load(self) -> None:
        """Run the data check and list what it and the run's predictions point at (again)."""
        if self.root is not None:
            self._loaded(self._list, "the data check failed")

    # --- listing -------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """The data folder: only an available review (one with a folder) gets this far."""
        assert self.root is not None, "the review has no data folder"
        return self.root

    def _list(self) -> None:
        from graftkit import defaults
        from graftkit.data.checks import find_problems
        from graftkit.data.folder import find_split_dirs, scan

        options = self.record.options
        assert self.source is not None  # a review with a data folder has its source
        val = options.get("val") if self.source == self.recorded else None
        test = options.get("test") if self.source == self.recorded else None
        folder = scan(self.source, options.get("val_split", defaults.VAL_SPLIT),
                      options.get("seed", defaults.SEED), strict=False, val=val, test=test,
                      multi_label=self.multi_label, label_sep=self.sep or " ")
        report = find_problems(folder)
        dirs = find_split_dirs(self.folder) if self.folder.is_dir() and not self.tables else None
        rows = self.table_rows.index(self._key)
        with self.lock:  # only now: the scan above may take minutes, the page polls meanwhile
            self.items, self.groups = {}, {g: [] for g in GROUPS}
            self.split_dirs = tuple(d.name for d in dirs) if dirs else ()
            self.table_rows.rows = rows
            split = {p: "train" for p in folder.train.paths}
            split.update({p: "val" for p in folder.val.paths})
            split.update({p: "test" for p in folder.test.paths})
            labels = {p: folder.label_text(y) for s in (folder.train, folder.val, folder.test)
                      for p, y in zip(s.paths, s.labels)}
            self._add_label_issues()
            self._add_predictions()
            by_location = self.history().locations()
            for finding in report.findings:
                group = FINDING_GROUP.get(finding.kind)
                if group is None:
                    continue
                for path in finding.paths:
                    others = [self._shown(p) for p in finding.paths if p != path]
                    why = finding.message + (f" (with {', '.join(others)})" if others else "")
                    self._add(group, path, split.get(path, "?"), labels.get(path), why, by_location)

    def labels_now(self, key: str) -> list[str] | None:
        """The labels the table holds for a listed image now (None: not in an editable row)."""
        return self.table_rows.labels_now(key, self.items[key].split)

    def _key(self, path: str) -> str | None:
        """A listed image's key: its path inside the data folder. A table may name images
        elsewhere: their rows are edited all the same, under a key made from the path."""
        rel = rel_path(path, self.folder)
        if rel is not None or not self.tables:
            return rel
        import hashlib

        full = os.path.abspath(path)
        key = f"{ELSEWHERE}/{hashlib.sha256(full.encode('utf-8')).hexdigest()[:16]}"
        self.elsewhere[key] = full
        return key

    def _shown(self, path: str) -> str:
        rel = rel_path(path, self.folder)
        return rel if rel is not None else str(path)

    def _add(self, group: str, path: str, split: str, label: str | None, why: str,
             by_location: dict[str, str] | None = None) -> Item:
        rel = rel_path(path, self.folder)
        key = self._key(path) or f"outside/{len(self.items)}"
        key = (by_location or {}).get(key, key)
        item = self.items.get(key)
        if item is None:
            label = label or (self._parts(rel)[1] if rel else "?")
            item = self.items[key] = Item(key, split, label)
        if key not in self.groups[group]:
            self.groups[group].append(key)
        item.reasons.setdefault(group, []).append(why)
        return item

    def _here(self, path: str) -> str:
        """A path the run recorded, in the data folder being reviewed (the same relative
        place: the folder may have been copied or moved since)."""
        recorded = Path(os.path.abspath(self.recorded)) if self.recorded else None
        if recorded is not None and recorded.is_file():
            recorded = recorded.parent
        rel = rel_path(path, recorded) if recorded is not None else None
        return str(self.folder / rel) if rel is not None else path

    def _add_label_issues(self) -> None:
        """The run's label issues (``label_issues.csv``), likeliest first."""
        from graftkit.labels.issues import FILE, read_csv

        try:
            issues = read_csv(self.run_dir / FILE)
        except (OSError, ValueError, KeyError):
            return
        for issue in issues:
            why = (f"#{issue.rank}: labelled {issue.given} (p {issue.p_given:.2f}), looks like "
                   f"{issue.suggested} (p {issue.p_suggested:.2f}) to heads that never "
                   "trained on it")
            item = self._add("label_issues", self._here(issue.path), issue.split, issue.given,
                             why)
            item.suggested, item.p_suggested = issue.suggested, issue.p_suggested
            item.p_given, item.rank = issue.p_given, issue.rank

    def _add_predictions(self) -> None:
        from graftkit.errors import RunError
        from graftkit.outputs.run import read_predictions

        try:
            rows = read_predictions(self.run_dir)
        except (RunError, OSError, ValueError):
            return
        rows.sort(key=lambda r: -float(r["loss"]))
        if self.multi_label:
            self._add_label_set_predictions(rows)
            return
        wrong = [r for r in rows if r["label"] != r["predicted"]]
        shown = wrong + [r for r in rows[:TOP_LOSSES] if r["label"] == r["predicted"]]
        shown.sort(key=lambda r: -float(r["loss"]))
        for r in shown:
            path = self._here(r["path"])  # listed where it was
            p, loss = float(r["probability"]), float(r["loss"])
            why = (f"predicted {r['predicted']} ({p:.2f}) for {r['label']}"
                   if r["label"] != r["predicted"] else
                   f"right, but unsure: {r['label']} at {float(r['true_probability']):.2f}")
            item = self._add("top_losses", path, "val", r["label"], f"{why}; loss {loss:.2f}")
            item.predicted, item.probability, item.loss = r["predicted"], p, loss

    def _add_label_set_predictions(self, rows: list[dict]) -> None:
        """Multi-label runs: the validation images with the largest losses (most of them with
        labels the model missed or added), each with what it would add and take away."""
        for r in rows[:2 * TOP_LOSSES]:
            given, said = r["labels"].split(), r["predicted"].split()
            missed = [x for x in given if x not in said]
            added = [x for x in said if x not in given]
            parts = ([f"missed: {', '.join(missed)}"] if missed else []) + \
                ([f"added: {', '.join(added)}"] if added else [])
            why = "; ".join(parts) or "right, but unsure"
            item = self._add("top_losses", self._here(r["path"]), "val", r["labels"],
                             f"{why}; loss {float(r['loss']):.2f}")
            item.predicted, item.loss = r["predicted"] or "(no label)", float(r["loss"])
            item.added, item.missed = added, missed

    # --- where listed files are now ------------------------------------------------------------

    def history(self) -> History:
        """The journal replayed (empty where files cannot be moved)."""
        return self.journal.history() if self.journal is not None else History()

    def _parts(self, rel: str) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
        """``(split folder, class, rest)`` of a path relative to the root."""
        parts = PurePosixPath(rel).parts
        if parts and parts[0] == SET_ASIDE:
            parts = parts[1:]
        n = 1 if self.split_dirs and parts and parts[0] in self.split_dirs else 0
        if len(parts) < n + 2:
            return parts[:n], "?", parts[n:]
        return parts[:n], parts[n], parts[n + 1:]

    def file(self, key: str, history: History | None = None) -> Path:
        """The listed file ``key`` as it is now; refused unless it is a file inside the root.
        ``history``: the journal replayed, when the caller has it already."""
        key = checked_path(key)
        if key not in self.items or self.root is None or key.startswith("outside/"):
            raise ReviewError("not an image this review lists", 404)
        now = (history or self.history()).where(key)
        path = Path(self.elsewhere[key]) if key in self.elsewhere else self.root / now
        if key not in self.elsewhere and not within(path, self.root):
            raise ReviewError("refused: the file leads outside the data folder (symbolic link)", 403)
        if not path.is_file():
            raise ReviewError(f"{now} is no longer in the data folder", 404)
        return path

    # --- actions -------------------------------------------------------------------------------

    def _writable(self) -> Journal:
        if self.journal is None:
            raise ReviewError(f"files cannot be moved here: {self.why_read_only}", 409)
        if self.state != "ready":
            raise ReviewError("the data check is still running: try again in a moment", 409)
        return self.journal

    def relabel(self, key: str, to: str) -> dict:
        """Move a listed image to class ``to``'s folder of the same split."""
        journal = self._writable()
        if to not in self.classes:
            raise ReviewError(f"unknown class {to!r}: choose one of {', '.join(self.classes)}")
        with self.lock, journal.locked():
            return self._relabel(journal, key, to, journal.history())

    def _relabel(self, journal: Journal, key: str, to: str, history: History) -> dict:
        """``relabel`` under the locks."""
        if self.tables:
            if self.multi_label:
                raise ReviewError("this run has several labels per image: add or remove a "
                                  "label instead", 409)
            return self._edit(journal, key, lambda labels: [to])
        now = self.file(key, history).relative_to(self.folder).as_posix()
        split, label, rest = self._parts(now)
        if label == to and not now.startswith(SET_ASIDE + "/"):
            raise ReviewError(f"the image is already labelled {to}", 409)
        target = free_name(self.folder.joinpath(*split, to, *rest))
        return journal.move(key, "relabel", now, target)

    def acceptable(self, min_p: float, history: History | None = None) -> list[str]:
        """The label issues "accept all" would relabel: a suggestion at ``min_p`` or above,
        on an image still where it was listed (one moved by hand since is the user's call)."""
        history = history or self.history()
        with self.lock:
            return [key for key in self.groups["label_issues"]
                    if (item := self.items[key]).suggested is not None
                    and item.p_suggested is not None and item.p_suggested >= min_p
                    and not history.stacks.get(key) and not key.startswith("outside/")
                    and item.suggested in self.classes]

    def accept(self, min_p: float) -> dict:
        """Relabel every acceptable label issue to its suggestion, each move journalled (so
        each can be undone, and "restore all since" undoes them together)."""
        journal = self._writable()
        done, problems = [], []
        with self.lock, journal.locked():
            history = journal.history()
            for key in self.acceptable(min_p, history):
                try:
                    done.append(self._relabel(journal, key, str(self.items[key].suggested),
                                              history))
                except ReviewError as exc:
                    problems.append(f"{key}: {exc}")
        return {"accepted": len(done), "actions": [_public(a) for a in done],
                "problems": problems}

    def edit_label(self, key: str, label: str, present: bool) -> dict:
        """Add ``label`` to a listed image's row of a multi-label table (``present``), or
        take it away."""
        journal = self._writable()
        if not self.multi_label:
            raise ReviewError("this run has one label per image: relabel it instead", 409)
        if label not in self.classes:
            raise ReviewError(f"unknown label {label!r}: choose one of {', '.join(self.classes)}")

        def change(labels: list[str]) -> list[str]:
            if (label in labels) == present:
                raise ReviewError(f"the image {'has' if present else 'does not have'} the "
                                  f"label {label} already", 409)
            return [x for x in labels if x != label] + ([label] if present else [])

        with self.lock, journal.locked():
            return self._edit(journal, key, change)

    def _edit(self, journal: Journal, key: str, change) -> dict:
        """The labels of a listed image's table row, changed by ``change`` (under the locks)."""
        if key not in self.items:
            raise ReviewError("not an image this review lists", 404)
        table, row = self.table_rows.row(key, self.items[key].split)
        before = self.labels_now(key)
        if before is None:
            raise ReviewError(f"{table} has no row for {row} any more: edit it by hand", 409)
        after = change(before)
        if sorted(after) == before:
            raise ReviewError(f"the image is already labelled {' '.join(before)}", 409)
        return journal.edit(key, table, row, self.sep, before, after)

    def set_aside(self, key: str) -> dict:
        """Move a listed image into ``.graft-set-aside/``, out of every later scan."""
        journal = self._writable()
        if self.tables:
            raise ReviewError("the data is a table: to leave an image out, delete its row from "
                              "the table (the review edits labels only)", 409)
        with self.lock, journal.locked():
            now = self.file(key, journal.history()).relative_to(self.folder).as_posix()
            if now.startswith(SET_ASIDE + "/"):
                raise ReviewError("the image is already set aside", 409)
            return journal.move(key, "set_aside", now, free_name(self.folder / SET_ASIDE / now))

    def undo(self, action_id: str) -> dict:
        """Undo a move and every later move of the same image."""
        with self.lock:
            return self._writable().undo(action_id)

    def restore(self, key: str) -> dict:
        """Put one image back where it was listed, whatever was done to it since."""
        with self.lock:
            return self._writable().restore(checked_path(key))

    def restore_since(self, since: str | datetime | None = None) -> dict:
        """Undo every move since ``since`` (a time or span, ``parse_time``); all when None."""
        journal = self._writable()
        when = parse_time(since) if since else None
        with self.lock:
            done, problems = journal.restore_since(when)
        return {"restored": len({a["key"] for a in done}), "actions": [_public(a) for a in done],
                "problems": problems}

    # --- what the page shows -------------------------------------------------------------------

    def item_dict(self, key: str, group: str, history: History) -> dict:
        item = self.items[key]
        stack = history.stacks.get(key, [])
        now = history.where(key) if not key.startswith("outside/") else None
        aside = bool(now and now.startswith(SET_ASIDE + "/"))
        if self.tables:
            held = self.labels_now(key) if now else None
            label = " ".join(held) if held is not None else item.label
            given = sorted(item.label.split()) if self.multi_label else [item.label]
            status = f"edited: {item.label or '(none)'} -> {label or '(none)'}" \
                if held is not None and held != given else ""
        else:
            held = None
            label = self._parts(now)[1] if now else item.label
            status = "set aside" if aside else (f"relabelled {item.label} -> {label}"
                                                if label != item.label else "")
        return {"key": key, "path": self.elsewhere.get(key) or now or key, "split": item.split,
                "label": item.label,
                "now": label, "status": status, "predicted": item.predicted,
                "labels": held, "editable": held is not None,
                "added": item.added, "missed": item.missed,
                "probability": item.probability, "loss": item.loss,
                "suggested": item.suggested, "p_suggested": item.p_suggested,
                "p_given": item.p_given, "rank": item.rank,
                "why": item.reasons.get(group, []), "image": now is not None,
                "undo": stack[-1]["id"] if stack else None, "moves": len(stack)}

    def summary(self) -> dict:
        """Everything the review page renders, as JSON."""
        with self.lock:
            history = self.history()
            groups = [{"id": g, "title": title,
                       "items": [self.item_dict(k, g, history) for k in self.groups[g]]}
                      for g, title in GROUPS.items()]
        data = self.source or ""
        bad = history.bad_lines
        problem = (f"{len(bad)} line(s) of {JOURNAL} could not be read and were skipped "
                   f"(line {', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}): "
                   "the moves they recorded cannot be undone from here") if bad else ""
        return {"state": self.state, "message": self.message, "data": data,
                "root": str(self.root or ""), "can_move": self.can_move,
                "mode": "table" if self.tables else "folders", "multi_label": self.multi_label,
                "tables": {split: rel_path(t, self.folder) or str(t)
                           for split, t in self.tables.items()} if self.root else {},
                "read_only": self.why_read_only, "classes": self.classes, "groups": groups,
                "actions": [_public(a) for a in history.standing()],
                "journal_problem": problem,
                "next": refit_command(self.run_dir, data),
                "journal": str(self.folder / JOURNAL) if self.journal else ""}


def refit_command(run_dir: Path, data: str) -> str:
    """The command that trains the run again on the data as it is now."""
    import shlex

    return f"graft refit {shlex.quote(str(run_dir))}" + (f" --data {shlex.quote(data)}"
                                                         if data else "")


def _public(action: dict) -> dict:
    """A journal entry as the API shows it (without the reader's line number)."""
    return {k: v for k, v in action.items() if not k.startswith("_")}

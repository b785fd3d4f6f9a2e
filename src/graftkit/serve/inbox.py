"""The inbox of ``graft serve --inbox FOLDER``: new images labelled with the model's help.

Every image of the folder gets the model's suggestion (``Classifier.suggest``), in the order
that teaches the model most (least sure first, near-copies apart); the ones the open-set score
calls unknown are listed apart. Accepting an image moves it into the training folder of its
class (``DATA/train/CLASS/`` when the data has ``train/``, else ``DATA/CLASS/``); setting it
aside moves it into the inbox's own ``.graft-set-aside/``. Every move goes through the data
folder's journal (paths in the inbox are ``@inbox/...``), so the review page's undo and
``graft review undo`` put an image back into the inbox.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from graftkit.serve.journal import (
    INBOX,
    SET_ASIDE,
    History,
    Journal,
    JournalError,
    checked_path,
    free_name,
    within,
)
from graftkit.serve.review import Background, refit_command

if TYPE_CHECKING:
    from graftkit.classifier import Classifier
    from graftkit.labels.inbox import Suggestion
    from graftkit.serve.review import Review


class Inbox(Background):
    """The inbox's images, their suggestions and the moves that label them (thread-safe)."""

    def __init__(self, folder: str | os.PathLike, review: Review, classifier: Classifier):
        self.folder = Path(os.path.abspath(os.path.expanduser(folder)))
        self.review, self.classifier = review, classifier
        self.state, self.message = "scoring", ""
        self.items: dict[str, Suggestion] = {}
        self.skipped: list[dict] = []
        self.lock = review.lock  # one lock for every move of the data folder
        why = review.why_read_only if review.root is not None else review.message
        if not why and review.tables:
            why = ("the data is a table: add a row for each new image to it (the suggestions "
                   "are listed here); the inbox files images into class folders only")
        if not why and not os.access(self.folder, os.W_OK | os.X_OK):
            why = f"{self.folder} is read-only for this user: suggestions only"
        self.why_read_only = why
        self.journal = (Journal(review.root, inbox=self.folder)
                        if review.root is not None and not why else None)

    def load(self) -> None:
        """Every image of the inbox (hidden folders skipped), scored and put in order."""
        self._loaded(self._score, "scoring the inbox failed")

    def _score(self) -> None:
        from graftkit.data.inputs import gather

        images = gather([str(self.folder)], self.classifier.image_size, check=False)
        found = self.classifier.suggest(images) if images.names else []
        items = {}
        for s in found:
            rel = Path(s.path).resolve().relative_to(self.folder.resolve()).as_posix()
            items[f"{INBOX}/{rel}"] = s
        with self.lock:
            self.items, self.skipped = items, list(images.skipped)
            self.message = "" if items else f"no image in {self.folder}"

    # --- where images go -----------------------------------------------------------------------

    def history(self) -> History:
        return self.journal.history() if self.journal is not None else History()

    def target(self, label: str) -> Path:
        """The training folder of class ``label``."""
        root = self.review.folder
        train = root / "train"
        return (train if "train" in self.review.split_dirs else root) / label

    def file(self, key: str, history: History | None = None) -> Path:
        """The inbox image ``key`` where it is now (in the inbox or the data folder)."""
        key = checked_path(key)
        if key not in self.items:
            raise JournalError("not an image of this inbox", 404)
        now = (history or self.history()).where(key)
        if now.startswith(INBOX + "/"):
            path = self.folder.joinpath(*now.split("/")[1:])
        else:
            path = self.review.folder / now
        if not within(path, self.folder, self.review.root):
            raise JournalError("refused: the file leads outside the inbox and the data folder "
                               "(symbolic link)", 403)
        if not path.is_file():
            raise JournalError(f"{now} is no longer there", 404)
        return path

    # --- actions -------------------------------------------------------------------------------

    def _writable(self) -> Journal:
        if self.journal is None:
            raise JournalError(f"images cannot be moved here: {self.why_read_only}", 409)
        if self.state != "ready" or self.review.state != "ready":
            raise JournalError("still scoring the inbox or checking the data: try again in a "
                               "moment", 409)
        return self.journal

    def _accept(self, journal: Journal, key: str, to: str, history: History) -> dict:
        now = history.where(key)
        name = now.rsplit("/", 1)[-1]
        source = self.file(key, history)
        if source.parent == self.target(to):
            raise JournalError(f"the image is already in {to}", 409)
        action = "accept" if now.startswith(INBOX + "/") else "relabel"
        return journal.move(key, action, now, free_name(self.target(to) / name))

    def accept(self, key: str, to: str) -> dict:
        """Move an inbox image into class ``to``'s training folder (or, once accepted, to
        another class)."""
        journal = self._writable()
        if to not in self.classifier.classes:
            raise JournalError(f"unknown class {to!r}: choose one of "
                               f"{', '.join(self.classifier.classes)}")
        with self.lock, journal.locked():
            return self._accept(journal, key, to, journal.history())

    def set_aside(self, key: str) -> dict:
        """Move an inbox image into the inbox's ``.graft-set-aside/``: not offered again."""
        journal = self._writable()
        with self.lock, journal.locked():
            history = journal.history()
            self.file(key, history)
            now = history.where(key)
            if now.startswith(f"{INBOX}/{SET_ASIDE}/"):
                raise JournalError("the image is already set aside", 409)
            rel = key.split("/", 1)[1]
            return journal.move(key, "set_aside", now, free_name(self.folder / SET_ASIDE / rel))

    def acceptable(self, min_p: float, history: History | None = None) -> list[str]:
        """What "accept all" would move: known images suggested at ``min_p`` or above, still
        in the inbox, in the page's order."""
        history = history or self.history()
        with self.lock:
            return [key for key, s in self.items.items()
                    if s.known and s.probability >= min_p and not history.stacks.get(key)]

    def accept_all(self, min_p: float) -> dict:
        journal = self._writable()
        done, problems = [], []
        with self.lock, journal.locked():
            history = journal.history()
            for key in self.acceptable(min_p, history):
                try:
                    done.append(self._accept(journal, key, self.items[key].suggested, history))
                except JournalError as exc:
                    problems.append(f"{key}: {exc}")
        return {"accepted": len(done), "actions": [_public(a) for a in done],
                "problems": problems}

    # --- what the page shows -------------------------------------------------------------------

    def item_dict(self, key: str, history: History) -> dict:
        s = self.items[key]
        stack = history.stacks.get(key, [])
        now = history.where(key)
        if now.startswith(f"{INBOX}/{SET_ASIDE}/"):
            where, status = "set aside", "set aside"
        elif now.startswith(INBOX + "/"):
            where, status = "inbox", ""
        else:
            where = now.split("/")[-2] if "/" in now else "?"
            status = f"labelled {where}"
        return {"key": key, "path": key.split("/", 1)[1], "order": s.order,
                "suggested": s.suggested, "probability": s.probability, "second": s.second,
                "p_second": s.p_second, "margin": s.margin, "known": s.known,
                "ood_score": s.ood_score, "now": where, "status": status,
                "undo": stack[-1]["id"] if stack else None, "moves": len(stack)}

    def summary(self) -> dict:
        with self.lock:
            history = self.history()
            items = [self.item_dict(k, history) for k in self.items]
        known = [i for i in items if i["known"]]
        unknown = [i for i in items if not i["known"]]
        accepted = sum(i["now"] not in ("inbox", "set aside") for i in items)
        data = self.review.source or ""
        return {"state": self.state, "message": self.message, "folder": str(self.folder),
                "data": data, "target": str(self.target("CLASS")) if self.review.root else "",
                "can_move": self.journal is not None and self.state == "ready",
                "read_only": self.why_read_only, "classes": list(self.classifier.classes),
                "items": known, "unknown": unknown, "accepted": accepted,
                "next": refit_command(self.review.run_dir, data),
                "skipped": [f"{s['path']}: {s['reason']}" for s in self.skipped]}


def _public(action: dict) -> dict:
    return {k: v for k, v in action.items() if not k.startswith("_")}

"""The data folder's journal of moves, and undo that walks each image back to where it was.

Every move the review makes (relabel, set aside, undo) is one line appended to
``DATA/.graft-journal.jsonl`` before the file moves, and a second line marking it done or
failed after. Data kept in a CSV/TSV table is changed the same way, row by row: an edit of an
image's labels is journalled, the table rewritten in one rename, and marked done.

The journal alone says where every image is: replaying its finished actions in
order gives each image (its ``key``: where it was when first listed) a stack of the moves that
still stand, and an undo takes moves off that stack. So undo goes all the way back, after
restarts and from several servers at once: every change to the journal and the files happens
under one lock on the folder (``.graft-journal.lock``), and each action replays the journal
first, so two servers never act on a stale view.

The journal must survive anything: a line cut short by a crash is skipped and reported (the next
append starts on a fresh line), every path read back is checked as strictly as a request's, and
a move cut short between its two lines is settled on the next start. This module needs no model
and no TensorFlow: ``graft review undo`` uses it directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from graftkit.files import fsync_dir

SET_ASIDE = ".graft-set-aside"
JOURNAL = ".graft-journal.jsonl"
LOCK = ".graft-journal.lock"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # reads +01:00 and +0100 alike
MOVES = ("relabel", "set_aside", "accept")  # accept: an inbox image into a class folder
# A change of an image's labels in a CSV/TSV table of the data (the file does not move: its
# ``from`` and ``to`` are its key). The entry names the table, the row's path cell, the label
# separator (None: one label per image) and the labels before and after; an undo is an edit
# back, with ``undoes``.
EDIT = "edit"
# Paths under this first segment are in the inbox folder of ``graft serve --inbox``, which lies
# outside the data folder; each entry that names one records the inbox's absolute path, so an
# undo (from the CLI too) knows where to put the image back.
INBOX = "@inbox"


class JournalError(Exception):
    """An action the journal cannot carry out; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def checked_path(key: str) -> str:
    """Refuse what cannot be a relative path inside the data folder: absolute paths, ``..``,
    backslashes, drive letters, NUL. Used on request keys and on paths read from the journal."""
    if not isinstance(key, str) or not key or "\x00" in key or "\\" in key \
            or key.startswith("/") or ":" in key:
        raise JournalError("invalid path", 400)
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise JournalError("invalid path", 400)
    return key


# A key as the API schema declares it: the same rule as ``checked_path``, as a regular expression.
_SEGMENT = r"(?:[^/\\:\x00.][^/\\:\x00]*|\.[^/\\:\x00.][^/\\:\x00]*|\.\.[^/\\:\x00]+)"
KEY_PATTERN = rf"^{_SEGMENT}(?:/{_SEGMENT})*$"


def within(path: str | os.PathLike, *roots: str | os.PathLike | None) -> bool:
    """``path``, symbolic links followed, is inside one of ``roots`` (None ones ignored)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r
               for r in (os.path.realpath(root) for root in roots if root is not None))


def rel_path(path: str | os.PathLike, root: Path) -> str | None:
    """``path`` as a POSIX path inside ``root``, or None when it is outside."""
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return None


def move_file(src: Path, dst: Path) -> None:
    """Move without ever overwriting: hard link, then unlink (plain rename where links are not
    supported, after checking the target is free). A symbolic link moves as itself, even when it
    dangles. ``FileExistsError`` when ``dst`` is taken."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):
        if os.path.lexists(dst):
            raise FileExistsError(dst) from None
        os.rename(src, dst)
    else:
        os.unlink(src)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def free_name(target: Path) -> Path:
    """``target``, or ``name-1.ext``, ``name-2.ext``... when taken."""
    candidate, n = target, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return candidate


SPAN_PATTERN = r"^\d{1,6}(\.\d{1,3})?[smhd]$"  # 30m, 2h, 1.5d: back from now


def parse_time(value: str | datetime) -> datetime:
    """``--since``: an ISO date/time (local time unless it has an offset) or a span back from
    now such as ``30m``, ``2h``, ``1d``."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.astimezone()
    span = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value or "")
    if span:
        seconds = float(span[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[span[2]]
        return datetime.now(timezone.utc) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value.strip().replace(" ", "T", 1))
    except (ValueError, AttributeError):
        raise JournalError(f"--since {value!r}: give a time such as 2026-12-04T14:30 or a span "
                           "back from now such as 30m, 2h or 1d") from None
    return when if when.tzinfo else when.astimezone()


def _entry_time(entry: dict) -> datetime | None:
    try:
        return datetime.strptime(entry["time"], TIME_FORMAT)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class History:
    """The journal replayed: for each image key, the moves that still stand, oldest first."""

    stacks: dict[str, list[dict]] = field(default_factory=dict)
    unsettled: list[dict] = field(default_factory=list)  # journalled, never marked done/failed
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of unreadable lines

    def where(self, key: str) -> str:
        """Where the image listed as ``key`` is now, relative to the data folder."""
        stack = self.stacks.get(key)
        return stack[-1]["to"] if stack else key

    def standing(self) -> list[dict]:
        """Every move that can still be undone, newest first."""
        moves = [a for stack in self.stacks.values() for a in stack]
        return sorted(moves, key=lambda a: a["_line"], reverse=True)

    def locations(self) -> dict[str, str]:
        """Current location -> key, for images that are away from home."""
        return {stack[-1]["to"]: key for key, stack in self.stacks.items() if stack}


def _valid_action(e: dict) -> bool:
    try:
        checked_path(e["key"])
        checked_path(e["from"])
        checked_path(e["to"])
        if e["action"] == EDIT:
            checked_path(e["table"])
            labels = (*e["before"], *e["after"])
            if not isinstance(e["row"], str) or not all(isinstance(x, str) for x in labels) \
                    or not (e["sep"] is None or isinstance(e["sep"], str) and e["sep"]):
                return False
    except (JournalError, KeyError, TypeError):
        return False
    return isinstance(e["id"], str) and e["action"] in (*MOVES, EDIT, "undo")


class Journal:
    """``.graft-journal.jsonl`` in a data folder: one JSON object per line.

    ``inbox``: a folder of new images outside the data folder whose files moves may take into
    it (paths ``@inbox/...``)."""

    def __init__(self, root: str | os.PathLike, inbox: str | os.PathLike | None = None):
        self.root = Path(os.path.abspath(root))
        self.path = self.root / JOURNAL
        self.inbox = Path(os.path.abspath(inbox)) if inbox is not None else None

    def resolve(self, rel: str, entry: dict | None = None) -> Path:
        """A journal path as a file path: inside the data folder, or the inbox (the one the
        entry recorded, else this journal's)."""
        if rel == INBOX or rel.startswith(INBOX + "/"):
            base = (entry or {}).get("inbox") or self.inbox
            if not base:
                raise JournalError(f"{rel}: an inbox path with no inbox folder recorded", 409)
            return Path(base).joinpath(*rel.split("/")[1:])
        return self.root / rel

    def relative(self, path: Path, inbox: Path | None = None) -> str:
        """``path`` as a journal path (inside the data folder, or ``@inbox/...``)."""
        inbox = inbox or self.inbox
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            if inbox is None:
                raise
            return f"{INBOX}/{path.relative_to(inbox).as_posix()}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes (two servers, or a server and the CLI)."""
        with open(self.root / LOCK, "a+b") as f:
            if sys.platform == "win32":
                import msvcrt

                f.seek(0)
                while True:
                    try:
                        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                        break
                    except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                        continue
                try:
                    yield
                finally:
                    f.seek(0)
                    msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def append(self, entry: dict) -> None:
        """One line, durably, always starting on a fresh line (a cut-off last line stays cut off
        alone instead of swallowing this one)."""
        line = json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> tuple[list[dict], list[int]]:
        """The readable entries (each with its line number as ``_line``) and the numbers of the
        lines that could not be read (cut short, not JSON, or naming paths out of the folder)."""
        if not self.path.is_file():
            return [], []
        entries, bad = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    bad.append(number)
                    continue
                if not isinstance(e, dict) or not isinstance(e.get("id"), str) or \
                        ("action" in e and not _valid_action(e)):
                    bad.append(number)
                    continue
                e["_line"] = number
                entries.append(e)
        return entries, bad

    def history(self) -> History:
        entries, bad = self.read()
        settled = {e["id"]: e for e in entries if "action" not in e}
        stacks: dict[str, list[dict]] = {}
        unsettled = []
        for e in entries:
            if "action" not in e:
                continue
            mark = settled.get(e["id"])
            if mark is None:
                unsettled.append(e)
                continue
            if not mark.get("done"):
                continue
            stack = stacks.setdefault(e["key"], [])
            undoes = e.get("undoes")
            undone = {undoes} if isinstance(undoes, str) else set(undoes or ())
            if e["action"] == EDIT and undone:  # an edit back: the file never moved
                stack[:] = [a for a in stack if a["id"] not in undone]
            elif e["action"] == "undo":
                stack[:] = [a for a in stack if a["id"] not in undone]
                home = stack[-1]["to"] if stack else e["key"]
                if e["to"] != home:  # put back beside its place (another file had its name):
                    stack.append({**e, "from": home})  # still away, and undoable again
            else:
                stack.append(e)
        return History({k: v for k, v in stacks.items() if v}, unsettled, bad)

    # --- moving files ----------------------------------------------------------------------

    def move(self, key: str, action: str, src_rel: str, target: Path,
             inbox: str | None = None, **extra) -> dict:
        """Journal, move, mark done (call under ``locked``): a crash between the steps is
        settled by ``recover``. ``inbox``: the inbox folder the paths may name (default: this
        journal's)."""
        inbox_dir = Path(inbox) if inbox else self.inbox
        context = {"inbox": str(inbox_dir)} if inbox_dir is not None else None
        source = self.resolve(src_rel, context)
        for path in (source, target):
            if not within(path.parent, self.root, inbox_dir):
                raise JournalError("refused: the move leads outside the data folder (symbolic "
                                   "link)", 403)
        to = self.relative(target, inbox_dir)
        entry = {"id": uuid.uuid4().hex[:12],
                 "time": datetime.now().astimezone().isoformat(timespec="seconds"),
                 "action": action, "key": key, "from": src_rel, "to": to, **extra}
        if INBOX in (src_rel.split("/")[0], to.split("/")[0], key.split("/")[0]):
            entry["inbox"] = str(inbox_dir)
        self.append(entry)
        try:
            move_file(source, target)
        except FileExistsError:
            self.append({"id": entry["id"], "failed": "target taken"})
            raise JournalError(f"{entry['to']} appeared meanwhile: try again", 409) from None
        except OSError as exc:
            self.append({"id": entry["id"], "failed": str(exc)})
            raise JournalError(f"cannot move {src_rel}: {exc.strerror or exc}", 409) from None
        self.append({"id": entry["id"], "done": True})
        return entry

    def edit(self, key: str, table: str, row: str, sep: str | None, before: list[str],
             after: list[str], **extra) -> dict:
        """Journal, rewrite the row's labels in ``table`` (relative to the data folder), mark
        done (call under ``locked``). Refused when the row no longer holds ``before`` (the table
        was edited by hand since): the journal never writes over a change it did not make."""
        from graftkit.data.table_edit import row_labels, set_row_labels
        from graftkit.errors import DataError

        path = self.root / checked_path(table)
        if not within(path, self.root):
            raise JournalError("refused: the table leads outside the data folder (symbolic "
                               "link)", 403)
        try:
            now = row_labels(path, row, sep)
        except DataError as exc:
            raise JournalError(str(exc), 409) from None
        if now is None:
            raise JournalError(f"{table} has no row for {row} any more: edit the table by hand",
                               409)
        if now != sorted(before):
            raise JournalError(f"{table}: the labels of {row} were changed by hand since "
                               f"({' '.join(now) or 'none'}): reload the page", 409)
        entry = {"id": uuid.uuid4().hex[:12],
                 "time": datetime.now().astimezone().isoformat(timespec="seconds"),
                 "action": EDIT, "key": key, "from": key, "to": key, "table": table, "row": row,
                 "sep": sep, "before": sorted(before), "after": sorted(after), **extra}
        self.append(entry)
        try:
            set_row_labels(path, row, after, sep)
        except (OSError, DataError) as exc:
            self.append({"id": entry["id"], "failed": str(exc)})
            raise JournalError(f"cannot write {table}: {getattr(exc, 'strerror', None) or exc}",
                               409) from None
        self.append({"id": entry["id"], "done": True})
        return entry

    def _settle_edit(self, e: dict) -> None:
        """An edit a crash cut short: done if the table holds its labels (the rename is
        atomic: the table is the old one or the new one), failed otherwise."""
        from graftkit.data.table_edit import leftover_temp_files, row_labels
        from graftkit.errors import DataError

        path = self.root / e["table"]
        try:
            now = row_labels(path, e["row"], e["sep"])
        except DataError:
            now = None
        for tmp in leftover_temp_files(path):
            with contextlib.suppress(OSError):
                tmp.unlink()
        if now is not None and now == sorted(e["after"]) != sorted(e["before"]):
            self.append({"id": e["id"], "done": True})
        else:
            self.append({"id": e["id"], "failed": "interrupted before the table was written"})

    def recover(self) -> int:
        """Finish or drop actions a crash cut short; returns how many were settled."""
        if not self.path.is_file():  # nothing was ever moved here: leave the folder as it is
            return 0
        with self.locked():
            unsettled = self.history().unsettled
            for e in unsettled:
                if e["action"] == EDIT:
                    self._settle_edit(e)
                    continue
                try:
                    src, dst = self.resolve(e["from"], e), self.resolve(e["to"], e)
                except JournalError:
                    self.append({"id": e["id"], "failed": "no inbox folder recorded"})
                    continue
                if os.path.lexists(dst) and os.path.lexists(src) and \
                        os.path.samestat(os.lstat(src), os.lstat(dst)):
                    os.unlink(src)  # linked but not yet unlinked (a dangling link too): finish
                if os.path.lexists(dst) and not os.path.lexists(src):
                    self.append({"id": e["id"], "done": True})
                else:
                    self.append({"id": e["id"], "failed": "interrupted before the move"})
        return len(unsettled)

    def undo(self, action_id: str) -> dict:
        """Put the image of a standing action back where it was before it, undoing every later
        move of the same image with it (one move of the file, one journal entry)."""
        with self.locked():
            history = self.history()
            for key, stack in history.stacks.items():
                position = next((i for i, a in enumerate(stack) if a["id"] == action_id), None)
                if position is not None:
                    return self._back(key, stack, position)
        raise JournalError("nothing to undo: that action was undone already or is unknown", 409)

    def restore(self, key: str) -> dict:
        """Put one image back where it was first listed."""
        with self.locked():
            stack = self.history().stacks.get(key)
            if not stack:
                raise JournalError("this image is where it was: nothing to restore", 409)
            return self._back(key, stack, 0)

    def restore_since(self, since: datetime | None = None) -> tuple[list[dict], list[str]]:
        """Undo every move made since ``since`` (every move when None), image by image. Returns
        the undo entries and one message per image that could not be put back in its place.

        An image whose place another moving image holds waits until that one has left; when
        images hold each other's places, one steps aside to a free name and goes home on the
        next pass. Only a file that will not move keeps an image from its place: then the image
        is put back beside it (``name-1.ext``) and reported."""
        done: list[dict] = []
        failed: dict[str, str] = {}
        with self.locked():
            for _ in range(4 * len(self.history().stacks) + 4):  # each pass moves, or it ends
                before = len(done)
                waiting = self._restore_pass(since, done, failed)
                if not waiting:
                    break
                if len(done) == before:  # they hold each other's places: one steps aside
                    done.append(self._back(*next(iter(waiting.values()))))
            problems = [f"{key}: {why}" for key, why in failed.items()]
            for key, stack in self.history().stacks.items():
                if key not in failed and stack[-1]["action"] == "undo" and \
                        self._position(stack, since) is not None:
                    problems.append(f"{key}: put back as {stack[-1]['to']}: its place is held "
                                    "by a file the review did not move")
        return done, problems

    @staticmethod
    def _position(stack: list[dict], since: datetime | None) -> int | None:
        """The first move of ``stack`` made at or after ``since`` (the first when None)."""
        if since is None:
            return 0
        return next((i for i, a in enumerate(stack)
                     if (t := _entry_time(a)) is not None and t >= since), None)

    def _restore_pass(self, since: datetime | None, done: list[dict],
                      failed: dict[str, str]) -> dict[str, tuple]:
        """Put back every image whose place is free (or held by a file that stays); returns
        those whose place another moving image still holds."""
        pending = {}
        for key, stack in self.history().stacks.items():
            position = self._position(stack, since)
            if position is not None and key not in failed:
                pending[key] = (key, stack, position)
        leaving = {stack[-1]["to"] for _, stack, _ in pending.values()
                   if stack[-1]["action"] != EDIT}
        waiting = {}
        for key, (_, stack, position) in pending.items():
            home = stack[position]["from"]
            if stack[position]["action"] == EDIT:  # a row of a table: no place to wait for
                try:
                    done.append(self._back(key, stack, position))
                except JournalError as exc:
                    failed[key] = str(exc)
                continue
            if os.path.lexists(self.resolve(home, stack[position])):
                if home in leaving:
                    waiting[key] = pending[key]
                    continue
                if stack[-1]["action"] == "undo":
                    continue  # already beside its place, which a file that stays holds
            try:
                done.append(self._back(key, stack, position))
            except JournalError as exc:
                failed[key] = str(exc)
        return waiting

    def _back(self, key: str, stack: list[dict], position: int) -> dict:
        first = stack[position]
        if first["action"] == EDIT:  # the labels before the first undone edit, written back
            last = stack[-1]
            return self.edit(key, first["table"], first["row"], first["sep"], last["after"],
                             first["before"], undoes=[a["id"] for a in stack[position:]])
        now = stack[-1]["to"]
        inbox = next((a["inbox"] for a in reversed(stack) if a.get("inbox")), None)
        context = {"inbox": inbox} if inbox else None
        if not os.path.lexists(self.resolve(now, context)):
            raise JournalError(f"{now} is no longer there: move it back by hand", 409)
        back = free_name(self.resolve(first["from"], context))
        return self.move(key, "undo", now, back, inbox=inbox,
                         undoes=[a["id"] for a in stack[position:]])

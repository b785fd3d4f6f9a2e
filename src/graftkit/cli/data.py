"""``graft check`` and ``graft review``: the data folder, before and after a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from graftkit import defaults
from graftkit.cli.common import Command, add_unsafe, table
from graftkit.errors import DataError, UsageError


def cmd_check(args) -> int:
    from graftkit.data.checks import find_problems
    from graftkit.data.folder import scan

    if args.labels:  # before the scan: imported after it, TensorFlow's C++ notes get through
        from graftkit.quiet import import_tensorflow

        import_tensorflow()
    folder = scan(args.data_dir, args.val_split, args.seed, strict=False, val=args.val,
                  test=args.test, multi_label=args.multi_label, label_sep=args.label_sep)
    if args.labels and folder.multi_label:
        raise UsageError("--labels looks for images whose one class looks wrong: these images "
                         "have several labels each; drop --labels")
    rep = find_problems(folder)
    issues = _label_issues(args, folder, rep) if args.labels else None
    if args.format == "json":
        out = rep.as_dict()
        if issues is not None:
            out["label_issues"] = {**issues.record(None),
                                   "issues": [dataclasses.asdict(i) for i in issues.issues]}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return rep.exit_code
    print(f"{rep.data}: {rep.split}")
    columns = list(next(iter(rep.counts.values()), {"train": 0, "val": 0}))
    rows = [[c, *(n[k] for k in columns)] for c, n in rep.counts.items()]
    print(table(rows, ["label (images)" if folder.multi_label else "class", *columns]))

    def short(path: str) -> str:  # paths are absolute; inside the data folder, say less
        rel = os.path.relpath(path, rep.data)
        return path if rel.startswith("..") else rel

    for g in rep.groups():
        shown = ", ".join(short(p) for p in g["examples"])
        more = f" (+{g['count'] - 3} more: --format json lists all)" if g["count"] > 3 else ""
        print(f"{g['severity']:<8} {g['kind']:<22} {g['message']}"
              + (f": {shown}{more}" if shown else ""))
    if issues is not None:
        _print_label_issues(issues, short)
    print(f"status: {rep.status} (exit code {rep.exit_code})")
    return rep.exit_code


def _label_issues(args, folder, rep):
    """``--labels``: the K-fold heads on the default base's features; each finding a warning.
    Nothing to look at when the folder cannot be trained on (a fatal finding)."""
    from graftkit.data.checks import FATAL, WARNING, Finding
    from graftkit.progress import progress_factory
    from graftkit.train.cross_fit import check_labels

    if rep.status == FATAL:
        print("labels: not checked, the folder has a fatal problem (below)", file=sys.stderr)
        return None
    issues = check_labels(folder, args.base, args.label_folds, args.seed, log=lambda m: print(
        m, file=sys.stderr), bars=progress_factory(True))
    rep.findings += [Finding(WARNING, "label_issue", f"labelled {i.given}, looks like "
                             f"{i.suggested} (p {i.p_given:.2f} -> {i.p_suggested:.2f})",
                             [i.path]) for i in issues.issues]
    return issues


def preflight_check(args) -> None:
    """--labels' base and folds, before a minute of scanning."""
    if args.labels:
        from graftkit.backbones.registry import check_base_name

        check_base_name(args.base)
        if args.label_folds < 2:
            raise UsageError(f"--label-folds must be at least 2 (got {args.label_folds})")
    elif args.base != defaults.DEFAULT_BACKBONE or args.label_folds != defaults.LABEL_FOLDS:
        raise UsageError("--base and --label-folds go with --labels")


def _print_label_issues(issues, short, shown: int = 20) -> None:
    print(f"labels: {issues.line()}")
    if not issues.issues:
        return
    rows = [[i.rank, short(i.path), i.split, f"{i.given} -> {i.suggested}",
             f"{i.p_given:.3f} -> {i.p_suggested:.3f}"] for i in issues.issues[:shown]]
    print(table(rows, ["rank", "image", "split", "given -> suggested", "p"]))
    if len(issues.issues) > shown:
        print(f"(+{len(issues.issues) - shown} more: --format json lists all)")


def cmd_review(args) -> int:
    """``graft review log|undo DATA``: the review page's journal, without a server or a model."""
    from graftkit.serve.journal import JOURNAL, Journal, JournalError, parse_time

    data = Path(args.data_dir)
    if data.is_file():  # a table: its journal is beside it
        data = data.parent
    if not data.is_dir():
        raise DataError(f"no such data folder: {data}")
    journal = Journal(data)
    if not journal.path.is_file():
        raise DataError(f"{data} has no {JOURNAL}: graft serve's review page never changed "
                        "anything there, so there is nothing to undo")
    chosen = sum(bool(x) for x in (args.ids, args.all, args.since, args.image))
    if args.action == "log" and chosen:
        raise UsageError("graft review log takes only the data folder")
    if args.action == "undo" and chosen != 1:
        raise UsageError("graft review undo needs one of: action IDs (graft review log lists "
                         "them), --image PATH, --since TIME or --all")
    try:
        if args.action == "log":
            return _review_log(journal)
        with journal.locked():  # a read-only folder fails here, before anything moves
            pass
        if args.all or args.since:
            done, problems = journal.restore_since(parse_time(args.since) if args.since else None)
        elif args.image:
            done, problems = [journal.restore(args.image.replace(os.sep, "/"))], []
        else:
            done, problems = [], []
            for action_id in args.ids:
                try:
                    done.append(journal.undo(action_id))
                except JournalError as exc:
                    problems.append(f"{action_id}: {exc}")
    except JournalError as exc:
        raise DataError(str(exc)) from None
    except PermissionError as exc:
        raise DataError(f"cannot change {data}: {exc.strerror}: run as a user who can write "
                        "there") from None
    for entry in done:
        print(f"put back: {_change(entry)}  (undoes {', '.join(entry['undoes'])})")
    print(f"{len(done)} image(s) put back" + (f", {len(problems)} could not be" if problems else ""))
    if problems:
        raise DataError("not put back: " + "; ".join(problems))
    return 0


def _change(entry: dict) -> str:
    """A journal entry's change: a move's paths, or a table edit's labels."""
    if entry["action"] == "edit":
        return (f"{entry['key']}: {' '.join(entry['before']) or '(no label)'} -> "
                f"{' '.join(entry['after']) or '(no label)'} in {entry['table']}")
    return f"{entry['from']} -> {entry['to']}"


def _review_log(journal) -> int:
    history = journal.history()
    rows = [[a["time"], a["id"], a["action"].replace("_", " "), _change(a)]
            for a in history.standing()]
    print(table(rows, ["time", "id", "action", "change"]) if rows else
          "every image is as it was: nothing to undo")
    if history.bad_lines:
        print(f"warning: line(s) {', '.join(map(str, history.bad_lines))} of {journal.path} could "
              "not be read and were skipped", file=sys.stderr)
    return 0


def preflight_suggest(args) -> None:
    from graftkit.classifier import parse_reject
    from graftkit.files import prepare_output_file
    from graftkit.outputs.run import read_run

    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise UsageError(f"--min-p must be between 0 and 1 (got {args.min_p:g})")
    parse_reject(args.reject)
    read_run(args.run_dir)
    if not Path(args.folder).exists():
        raise DataError(f"no such file or folder: {args.folder}")
    prepare_output_file(args.out, "--out")  # before the work: a bad path must not cost it


def cmd_suggest(args) -> int:
    """``graft suggest RUN FOLDER --out suggestions.csv``: the inbox's order and suggestions."""
    from graftkit.classifier import load
    from graftkit.data.inputs import gather
    from graftkit.labels.inbox import write_csv

    clf = load(args.run_dir, args.unsafe)
    images = gather([args.folder], clf.image_size, check=False)  # checked as they are decoded
    if not images.names:
        raise UsageError(f"no readable image in {args.folder}")
    found = clf.suggest(images, order=args.order, reject=args.reject, tta=args.tta)
    for item in images.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if not found:
        raise UsageError(f"no readable image in {args.folder}")
    write_csv(args.out, found)
    unknown = sum(not s.known for s in found)
    print(f"wrote {len(found)} suggestions to {args.out}, in the order to check them "
          f"({args.order}" + (f"; {unknown} unlike every class, last" if unknown else "") + ")")
    for p in sorted({args.min_p or 0.9, 0.8, 0.9, 0.95}):
        sure = sum(s.known and s.probability >= p for s in found)
        print(f"  p >= {p:.2f}: {sure} of {len(found)} images ({sure / len(found):.0%})")
    return 0


def _suggest_arguments(p: argparse.ArgumentParser) -> None:
    from graftkit.labels.inbox import DEFAULT_ORDER, ORDERS

    p.add_argument("run_dir")
    p.add_argument("folder", help="a folder of unlabelled images")
    p.add_argument("--out", required=True, help="the CSV to write (order, path, suggested, "
                                                 "probability, second, p_second, margin, known, "
                                                 "ood_score)")
    p.add_argument("--order", choices=ORDERS, default=DEFAULT_ORDER,
                   help="diverse: least sure first, near-copies apart (default); uncertain; "
                        "confident: surest first; random")
    p.add_argument("--min-p", type=float, help="also count the images suggested at this "
                                               "probability or above")
    p.add_argument("--reject", default="auto", metavar="auto|none|THRESHOLD",
                   help="when an image is unlike every class (listed last): as graft predict")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image with its mirror image (default: when the run "
                        "trained on mirrored views)")
    add_unsafe(p)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir")
    p.add_argument("--val", help="validation data: a class folder or a CSV/TSV")
    p.add_argument("--test", help="held-out test data: a class folder or a CSV/TSV (default: "
                                  "DATA/test/ beside DATA/train/)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--multi-label", action="store_true",
                   help="several labels per image: implied by a table whose label column is "
                        "named labels")
    p.add_argument("--label-sep", default=" ",
                   help="separator of the label names in a multi-label table's cell")
    p.add_argument("--val-split", type=float, default=defaults.VAL_SPLIT)
    p.add_argument("--seed", type=int, default=defaults.SEED)
    p.add_argument("--labels", action="store_true",
                   help="also look for wrong labels: heads on the pretrained base's features, "
                        "each scoring the images it did not train on (a minute or so; the "
                        "features are cached for graft fit)")
    p.add_argument("--label-folds", type=int, default=defaults.LABEL_FOLDS, metavar="K",
                   help="--labels: heads (folds) to train (default %(default)s)")
    p.add_argument("--base", default=defaults.DEFAULT_BACKBONE,
                   help="--labels: the pretrained base (default %(default)s)")


def _review_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("log", "undo"))
    p.add_argument("data_dir", help="the data folder (or table) the review page changed")
    p.add_argument("ids", nargs="*", help="action IDs to undo (graft review log lists them)")
    p.add_argument("--all", action="store_true", help="undo every move and edit")
    p.add_argument("--since", metavar="TIME", help="undo the changes since TIME (ISO time, or "
                                                   "30m, 2h, 1d back from now)")
    p.add_argument("--image", metavar="PATH", help="put this image back as it was listed "
                                                   "(its path inside the data folder)")


COMMANDS = (
    Command(
        "suggest", "label new images with a run: the suggestions, in the order to check them",
        run=cmd_suggest, arguments=_suggest_arguments, preflight=preflight_suggest,
        tensorflow=True,
        examples="""
graft suggest runs/photos inbox/ --out suggestions.csv
graft suggest runs/photos inbox/ --out sure.csv --order confident --min-p 0.9
graft serve runs/photos --data photos/ --inbox inbox/   # the same, as a page with accept buttons
""",
    ),
    Command(
        "check", "check an image folder: unreadable files, duplicates, leakage, imbalance",
        run=cmd_check, arguments=_check_arguments, preflight=preflight_check,
        examples="""
graft check photos/
graft check photos/ --format json
graft check photos/ --labels                     # also the labels that look wrong, ranked
exit codes of check: 0 clean, 1 warnings, 2 fatal (e.g. fewer than 2 classes)
""",
    ),
    Command(
        "review", "list or undo what graft serve's review page changed: moves of files in a "
        "data folder, edits of a table's labels",
        run=cmd_review, arguments=_review_arguments,
        examples="""
graft review log photos/                         # the moves that can be undone, newest first
graft review undo photos/ --all                  # every image back where it was
graft review undo photos/ --since 2h             # every move of the last two hours (or --since 2026-12-04T14:30)
graft review undo photos/ --image val/ants/x.jpg # one image back where it was listed
graft review undo photos/ 3f9c2a1b7d04           # one move (and later moves of the same image)
graft review undo aerial/train.csv --all         # every label edit of a table undone
""",
    ),
)

"""``graft``: a thin command line over the library; every command is a library call.

User errors (``GraftError``) end in one line on stderr and a documented exit code; see
``graftkit.errors.EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from graftkit import defaults
from graftkit.errors import EXIT_CODES, DataError, DiskFullError, GraftError, UsageError
from graftkit.outputs.summary import print_summary
from graftkit.quiet import import_tensorflow


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


# --- commands -----------------------------------------------------------------------------

def _training_kwargs(args) -> dict:
    from graftkit.options import from_arguments

    return {**from_arguments(args), "unsafe": args.unsafe, "verbose": _verbose()}


def preflight_fit(args) -> None:
    from graftkit.train.workflow import check_inputs, make_options

    kwargs = _training_kwargs(args)
    kwargs.pop("unsafe"), kwargs.pop("verbose")
    options = make_options(**kwargs)
    overwrite = getattr(args, "overwrite", True)  # lr-find's plots folder is rewritten
    check_inputs(args.data_dir, args.out, options, overwrite, getattr(args, "tensorboard", False))


def cmd_fit(args) -> int:
    from graftkit.train.workflow import fit

    result = fit(args.data_dir, args.out, resume=args.resume, tensorboard=args.tensorboard,
                 overwrite=args.overwrite, **_training_kwargs(args))
    if "phases" not in result.metrics:  # a worker of a cluster other than the chief
        return 0
    print_summary(result.metrics, result.run_dir)
    return 0


def cmd_lr_find(args) -> int:
    from graftkit.train.workflow import lr_find

    phase = args.phase.replace("-", "_")
    tests = lr_find(args.data_dir, args.out, phase, overwrite=True, **_training_kwargs(args))
    test = tests[phase]
    print(f"\nsuggested {'--lr' if phase == 'head' else '--fine-tune-lr'} {test['suggestion']:.3g}"
          f"  (steepest fall of the smoothed loss over {test['steps']} steps; loss lowest at "
          f"{test['minimum']:.3g}; plot {Path(args.out) / test['plot']})")
    return 0


def cmd_check(args) -> int:
    from graftkit.data.checks import check

    rep = check(args.data_dir, args.val_split, args.seed, args.val, args.test)
    if args.format == "json":
        print(json.dumps(rep.as_dict(), indent=2, ensure_ascii=False))
        return rep.exit_code
    print(f"{rep.data}: {rep.split}")
    columns = list(next(iter(rep.counts.values()), {"train": 0, "val": 0}))
    rows = [[c, *(n[k] for k in columns)] for c, n in rep.counts.items()]
    print(_fmt_table(rows, ["class", *columns]))
    def short(path: str) -> str:  # paths are absolute; inside the data folder, say less
        rel = os.path.relpath(path, rep.data)
        return path if rel.startswith("..") else rel

    for g in rep.groups():
        shown = ", ".join(short(p) for p in g["examples"])
        more = f" (+{g['count'] - 3} more: --format json lists all)" if g["count"] > 3 else ""
        print(f"{g['severity']:<8} {g['kind']:<22} {g['message']}"
              + (f": {shown}{more}" if shown else ""))
    print(f"status: {rep.status} (exit code {rep.exit_code})")
    return rep.exit_code


def _progress(done: int, total: int) -> None:
    """On stderr, so that stdout stays clean JSON/CSV."""
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        end = "\n" if done == total else ""
        print(f"\rpredicting [{'=' * filled}{'.' * (width - filled)}] {done}/{total}",
              end=end, file=sys.stderr, flush=True)


def preflight_predict(args) -> None:
    from graftkit.files import prepare_output_file
    from graftkit.outputs.run import read_run

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {args.top_k})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    from graftkit.classifier import parse_reject

    parse_reject(args.reject)
    read_run(args.run_dir)
    for path in args.paths:
        if not Path(path).exists():
            raise DataError(f"no such file or folder: {path}")
    if args.output:  # before the work: a bad path must not cost every prediction
        prepare_output_file(args.output)


def cmd_predict(args) -> int:
    from graftkit.classifier import load
    from graftkit.data.inputs import gather

    clf = load(args.run_dir, args.unsafe)
    images = gather(args.paths, clf.image_size)  # each file probed once, here
    for item in images.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if not images.names:
        raise UsageError("no readable image among the given paths")
    top_k = min(args.top_k, len(clf.classes))
    preds = clf.predict(images, top_k=top_k, batch_size=args.batch_size, tta=args.tta,
                        progress=_progress, reject=args.reject)
    if clf.open_set_note:
        print(f"note: {clf.open_set_note}", file=sys.stderr)
    if args.format == "json":
        text = "".join(json.dumps(p.as_dict(), ensure_ascii=False) + "\n" for p in preds)
    elif args.format == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "probability", "top_k", "known", "ood_score"])
        for p in preds:
            w.writerow([p.path, p.label, f"{p.probability:.6f}",
                        ";".join(f"{lab}:{q:.6f}" for lab, q in p.top_k),
                        str(p.known).lower(), "" if p.ood_score is None else f"{p.ood_score:.6g}"])
        text = buf.getvalue()
    else:
        rows = [[p.path, str(p), f"{p.probability:.4f}",
                 ", ".join(f"{lab} {q:.3f}" for lab, q in p.top_k),
                 "" if p.ood_score is None else f"{p.ood_score:.3f}"] for p in preds]
        text = _fmt_table(rows, ["path", "label", "probability", f"top {top_k}",
                                 "ood score"]) + "\n"
        unknown = sum(not p.known for p in preds)
        if unknown:
            text += (f"{unknown} of {len(preds)} images unlike the training images (score above "
                     f"{clf.threshold(args.reject):.4g}): answered unknown with the closest "
                     "class\n")
    if args.output:
        from graftkit.files import write_text

        write_text(Path(args.output), text)
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def preflight_evaluate(args) -> None:
    from graftkit.data.folder import check_data_path
    from graftkit.outputs.run import read_run

    read_run(args.run_dir)
    check_data_path(args.data_dir)


def cmd_evaluate(args) -> int:
    from graftkit.classifier import load

    result = load(args.run_dir, args.unsafe).evaluate(args.data_dir, tta=args.tta)
    overlap = result["overlap"]
    if overlap["checked"] is False:
        print(f"note: {overlap['message']}", file=sys.stderr)
    elif overlap["count"]:
        print(f"warning: {overlap['message']}", file=sys.stderr)
    if result["chosen_on"]["count"]:
        print(f"note: {result['chosen_on']['message']}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(f"accuracy {result['accuracy']:.4f} on {result['num_images']} images of {result['data']}")
    if "tta" in result:
        t = result["tta"]
        print(f"with --tta (image and mirror image averaged): accuracy {t['accuracy']:.4f} "
              f"(gain {t['gain']:+.4f}), balanced accuracy {t['balanced_accuracy']:.4f} "
              f"(gain {t['balanced_gain']:+.4f})")
    rejected = result["rejected"]
    if rejected["share"] is not None:
        print(f"unknown: {rejected['count']} of {result['num_images']} images "
              f"({rejected['share']:.1%}) score above the run's threshold "
              f"({rejected['method']} score {rejected['threshold']:.4g})")
    else:
        print(f"note: {rejected['message']}", file=sys.stderr)
    rows = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
            for c, v in result["per_class"].items()]
    print(_fmt_table(rows, ["class", "precision", "recall", "f1", "images"]))
    classes = list(result["per_class"])
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(_fmt_table([[c, *row] for c, row in zip(classes, result["confusion_matrix"])],
                     ["", *classes]))
    for item in result["skipped_files"]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    return 0


def preflight_inspect(args) -> None:
    from graftkit.backbones.inspect import check_target

    check_target(args.target)


def cmd_inspect(args) -> int:
    from graftkit.backbones.inspect import inspect_target

    title, rows, totals = inspect_target(args.target, flatten=args.all, unsafe=args.unsafe)
    if args.format == "json":
        print(json.dumps({"model": title, "layers": rows, "totals": totals}, indent=2))
        return 0
    print(title)
    table = [[r["layer"], r["type"], r["weights"], r["trainable_weights"],
              r["non_trainable_weights"], f"{r['params']:,}", f"{r['trainable_params']:,}"]
             for r in rows]
    print(_fmt_table(table, ["layer", "type", "weights", "trainable", "non_trainable",
                             "params", "trainable_params"]))
    print(f"\ntotal: {totals['weights']} weights ({totals['trainable_weights']} trainable, "
          f"{totals['non_trainable_weights']} non-trainable); {totals['params']:,} parameters "
          f"({totals['trainable_params']:,} trainable)")
    if "trained" in totals:
        print(totals["trained"])
    return 0


def cmd_backbones(args) -> int:
    from graftkit.backbones.inspect import backbone_rows

    rows = backbone_rows()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(_fmt_table([[r["name"], r["input_size"], r["fit_size"], f"{r['imagenet_top1']:.1f}",
                       f"{r['params']:,}", r["preprocessing"],
                       "yes" if r["weights_on_disk"] else "no", r["weights_source"]] for r in rows],
                     ["name", "input", "photos at", "ImageNet top-1 %", "params", "preprocessing",
                      "weights on disk", "weights from"]))
    print("\n'photos at': the side graft fit uses for photos (--image-size to change it). "
          "Accuracy and time of each offline backbone on real data: docs/backbones.md")
    return 0


def cmd_cache(args) -> int:
    from graftkit.defaults import cache_dir
    from graftkit.frozen import store

    if args.action == "clear":
        freed = store.clear()
        print(f"freed {freed / 1e6:.1f} MB in {cache_dir()} (converted backbone weights kept)")
        return 0
    entries = store.cache_entries()
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["kind"], e["set"]), []).append(e)
    rows = []
    for (kind, name), es in sorted(groups.items(), key=lambda kv: -max(e["used"] for e in kv[1])):
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(e["used"] for e in es)))
        rows.append([kind, name, len(es), f"{sum(e['bytes'] for e in es) / 1e6:.1f} MB", last])
    total = sum(e["bytes"] for e in entries)
    if rows:
        print(_fmt_table(rows, ["kind", "set", "files", "size", "last used"]))
    print(f"{cache_dir()}: {total / 1e6:.1f} MB of frozen outputs and engines in "
          f"{len(entries)} files; limit {store.cache_limit_bytes() / 1e9:.1f} GB "
          f"(${defaults.CACHE_LIMIT_ENV}), least recently used removed first")
    return 0


def cmd_report(args) -> int:
    from graftkit.outputs.report import build_report

    print(f"wrote {build_report(args.run_dir)}")
    return 0


def preflight_export(args) -> None:
    from graftkit.outputs.export import check_request
    from graftkit.outputs.run import read_run

    check_request(args.format, args.quantize)  # a combination that cannot be: before TensorFlow
    read_run(args.run_dir)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: pass a folder for the export")


def cmd_export(args) -> int:
    from graftkit.outputs.export import export, summary

    result = export(args.run_dir, args.format, args.quantize, args.out,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary(result))
    return 0


def preflight_serve(args) -> None:
    import importlib.util

    from graftkit.data.folder import check_data_path
    from graftkit.outputs.run import read_run

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError("graft serve needs the serve extra (FastAPI, uvicorn): "
                         "pip install 'graftkit[serve]'")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (got {args.port})")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be above 0 (got {args.max_upload_mb})")
    if args.max_pixels < 1 or args.max_files < 1:
        raise UsageError("--max-pixels and --max-files must be at least 1")
    read_run(args.run_dir)
    if args.data:
        check_data_path(args.data)
    from graftkit.serve.server import bind

    args.sock = bind(args.host, args.port)  # before TensorFlow loads: a taken port is told at once


def cmd_serve(args) -> int:
    from graftkit.serve.server import serve

    return serve(args.run_dir, args.data, args.host, args.port, args.max_upload_mb, args.unsafe,
                 log=lambda line: print(line, flush=True), sock=args.sock,
                 max_pixels=args.max_pixels, max_files=args.max_files,
                 allow_hosts=args.allow_host or (), quiet=args.quiet)


def cmd_review(args) -> int:
    """``graft review log|undo DATA``: the review page's journal, without a server or a model."""
    from graftkit.serve.journal import JOURNAL, Journal, JournalError, parse_time

    data = Path(args.data_dir)
    if not data.is_dir():
        raise DataError(f"no such data folder: {data}")
    journal = Journal(data)
    if not journal.path.is_file():
        raise DataError(f"{data} has no {JOURNAL}: graft serve's review page never moved a file "
                        "there, so there is nothing to undo")
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
        print(f"put back: {entry['from']} -> {entry['to']}  (undoes {', '.join(entry['undoes'])})")
    print(f"{len(done)} image(s) put back" + (f", {len(problems)} could not be" if problems else ""))
    if problems:
        raise DataError("not put back: " + "; ".join(problems))
    return 0


def _review_log(journal) -> int:
    history = journal.history()
    rows = [[a["time"], a["id"], a["action"].replace("_", " "), f"{a['from']} -> {a['to']}"]
            for a in history.standing()]
    print(_fmt_table(rows, ["time", "id", "action", "move"]) if rows else
          "every image is where it was: no move to undo")
    if history.bad_lines:
        print(f"warning: line(s) {', '.join(map(str, history.bad_lines))} of {journal.path} could "
              "not be read and were skipped", file=sys.stderr)
    return 0


def preflight_demo(args) -> None:
    from graftkit.outputs.run import check_run_dir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: pass a folder for the demo's data and run")
    check_run_dir(out / "run", args.overwrite)


def cmd_demo(args) -> int:
    from graftkit.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, verbose=_verbose())
    return 0


# --- parser -------------------------------------------------------------------------------

def _sub(subs, name: str, func, help_text: str, examples: str):
    p = subs.add_parser(
        name, help=help_text, description=help_text, allow_abbrev=False,  # --head-epoch: a typo
        epilog="examples:\n" + textwrap.indent(examples.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def _training_options(p, out_help: str = "run folder to write") -> None:
    """The options of fit that decide the data, the model and the phases (lr-find takes them),
    from their one declaration (``graftkit.options.FIT_OPTIONS``), in argument groups."""
    from graftkit.options import add_arguments

    p.add_argument("data_dir", help="one subfolder per class, train/ and val/ of them, or a "
                                    "CSV/TSV of path,label rows")
    p.add_argument("--out", required=True, help=out_help)
    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft", allow_abbrev=False,
        description="Transfer learning and fine-tuning of pretrained image models, done right.",
        epilog="exit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from graftkit import __version__

    parser.add_argument("--version", action="version", version=f"graftkit {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    _training_commands(subs)
    _data_commands(subs)
    _run_commands(subs)
    _other_commands(subs)
    return parser


def _unsafe(p) -> None:
    p.add_argument("--unsafe", action="store_true",
                   help="allow model files that contain code (Lambda layers): trusted files only")


def _training_commands(subs) -> None:
    p = _sub(subs, "fit", cmd_fit, "train a classifier on an image folder (two phases)", """
graft fit photos/ --out runs/photos
graft fit photos/ --out runs/fast --fine-tune-epochs 0 --no-augment
graft fit photos/ --out runs/top --unfreeze 3 --fine-tune-lr 1e-4
graft fit photos/ --out runs/chain --base runs/earlier/model.keras
graft fit labels.csv --out runs/csv --val val_labels.csv   # rows: path,label
""")
    _training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _unsafe(p)
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard logs of both phases in OUT/tensorboard/")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (the same command does it too)")

    p = _sub(subs, "lr-find", cmd_lr_find,
             "learning-rate range test: a plot and a suggested rate for a phase", """
graft lr-find photos/ --out runs/lr                       # phase 1 (head), seconds
graft lr-find photos/ --out runs/lr --phase fine-tune     # phase 2 on cached activations
graft fit photos/ --out runs/photos --lr auto --fine-tune-lr auto   # the same, inside fit
""")
    _training_options(p, "folder for the plots (lr_find_head.png, lr_find_fine_tune.png)")
    p.add_argument("--phase", choices=("head", "fine-tune"), default="head",
                   help="head: phase 1 on cached features; fine-tune: phase 1, then the test "
                        "for phase 2 on cached activations (--unfreeze N)")
    _unsafe(p)


def _data_commands(subs) -> None:
    p = _sub(subs, "check", cmd_check,
             "check an image folder: unreadable files, duplicates, leakage, imbalance", """
graft check photos/
graft check photos/ --format json
exit codes of check: 0 clean, 1 warnings, 2 fatal (e.g. fewer than 2 classes)
""")
    p.add_argument("data_dir")
    p.add_argument("--val", help="validation data: a class folder or a CSV/TSV")
    p.add_argument("--test", help="held-out test data: a class folder or a CSV/TSV (default: "
                                  "DATA/test/ beside DATA/train/)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--val-split", type=float, default=defaults.VAL_SPLIT)
    p.add_argument("--seed", type=int, default=defaults.SEED)

    p = _sub(subs, "predict", cmd_predict, "predict the class of images", """
graft predict runs/photos photo.jpg
graft predict runs/photos new_photos/ --top-k 3 --format json
graft predict runs/photos new_photos/ --tta --format csv --output predictions.csv
""")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image with its mirror image")
    p.add_argument("--reject", default="auto", metavar="auto|none|THRESHOLD",
                   help="when an image is 'unknown' (unlike the training images): auto, the "
                        "run's threshold (keeps 95%% of its validation images); none, never; "
                        "or a threshold in the score's units (metrics.json open_set)")
    p.add_argument("--output", help="write the predictions to this file instead of stdout")
    _unsafe(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = _sub(subs, "evaluate", cmd_evaluate, "score a run on labelled images", """
graft evaluate runs/photos photos/            # photos/val/ when it has train/ and val/
graft evaluate runs/photos test_photos/ --format json
graft evaluate runs/photos test_photos/ --tta   # and the gain of test-time augmentation
""")
    p.add_argument("run_dir")
    p.add_argument("data_dir")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (mirror image) and report its gain")
    _unsafe(p)
    p.add_argument("--format", choices=("table", "json"), default="table")


def _run_commands(subs) -> None:
    p = _sub(subs, "inspect", cmd_inspect,
             "weights / trainable_weights / non_trainable_weights per layer", """
graft inspect runs/photos
graft inspect efficientnet_lite0 --all
graft inspect some/model.keras --format json
""")
    p.add_argument("target", help="run folder, .keras file or backbone name")
    p.add_argument("--all", action="store_true", help="every layer inside nested models")
    _unsafe(p)
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = _sub(subs, "report", cmd_report, "rebuild RUN_DIR/report.html (self-contained)", """
graft report runs/photos
""")
    p.add_argument("run_dir")

    p = _sub(subs, "export", cmd_export,
             "export for TF Serving, TFLite or ONNX, verified by that runtime", """
graft export runs/photos --format savedmodel
graft export runs/photos --format tflite --quantize int8
graft export runs/photos --format onnx --out deploy/
""")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("savedmodel", "tflite", "onnx"), default="savedmodel")
    p.add_argument("--quantize", choices=("none", "float16", "int8"), default="none",
                   help="tflite: none|float16|int8; onnx: none|int8; savedmodel: none")
    p.add_argument("--out", help="folder for the export (default RUN_DIR/export/FORMAT[-Q])")

    p = _sub(subs, "serve", cmd_serve,
             "the run as a local web app and HTTP API, with a page to review its data", """
graft serve runs/photos                     # http://127.0.0.1:8000/ (try page), /review, /predict
graft serve runs/photos --data photos/ --port 8080
curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'
""")
    p.add_argument("run_dir")
    p.add_argument("--data", help="the data folder to review (default: the run's own)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; another than 127.0.0.1 (e.g. 0.0.0.0) opens the "
                        "try page and the API to other machines")
    p.add_argument("--port", type=int, default=defaults.SERVE_PORT, help="0: any free port")
    p.add_argument("--max-upload-mb", type=float, default=defaults.SERVE_MAX_UPLOAD_MB,
                   help="largest request body accepted (larger: HTTP 413)")
    p.add_argument("--max-pixels", type=int, default=defaults.SERVE_MAX_PIXELS,
                   help="largest image decoded, in pixels (larger: HTTP 400); bounds memory")
    p.add_argument("--max-files", type=int, default=defaults.SERVE_MAX_FILES,
                   help="most images in one POST /predict (more: HTTP 413)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="another host name requests may use (e.g. behind a reverse proxy); "
                        "repeatable")
    p.add_argument("--quiet", action="store_true", help="no access-log line per request")
    _unsafe(p)

    p = _sub(subs, "review", cmd_review,
             "list or undo the moves graft serve's review page made in a data folder", """
graft review log photos/                         # the moves that can be undone, newest first
graft review undo photos/ --all                  # every image back where it was
graft review undo photos/ --since 2h             # every move of the last two hours (or --since 2026-12-04T14:30)
graft review undo photos/ --image val/ants/x.jpg # one image back where it was listed
graft review undo photos/ 3f9c2a1b7d04           # one move (and later moves of the same image)
""")
    p.add_argument("action", choices=("log", "undo"))
    p.add_argument("data_dir", help="the data folder the review page changed")
    p.add_argument("ids", nargs="*", help="action IDs to undo (graft review log lists them)")
    p.add_argument("--all", action="store_true", help="undo every move")
    p.add_argument("--since", metavar="TIME", help="undo the moves since TIME (ISO time, or 30m, "
                                                   "2h, 1d back from now)")
    p.add_argument("--image", metavar="PATH", help="put this image back where it was listed "
                                                   "(its path inside the data folder)")


def _other_commands(subs) -> None:
    p = _sub(subs, "backbones", cmd_backbones, "list the backbones graftkit can build", """
graft backbones
graft backbones --format json
""")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = _sub(subs, "cache", cmd_cache,
             "show or clear the cache of frozen-base outputs (what makes a rerun fast)", """
graft cache info
graft cache clear
""")
    p.add_argument("action", choices=("info", "clear"))

    p = _sub(subs, "demo", cmd_demo,
             "fine-tune EfficientNet-Lite0 on scikit-learn's digits, offline", """
graft demo
graft demo --out /tmp/demo --overwrite
""")
    p.add_argument("--out", default="demo-run", help="folder for the data and the run")
    p.add_argument("--overwrite", action="store_true")


# Checks of paths and option values that need no TensorFlow: a typo is answered at once.
PREFLIGHT = {"fit": preflight_fit, "lr-find": preflight_fit, "predict": preflight_predict,
             "evaluate": preflight_evaluate, "inspect": preflight_inspect,
             "export": preflight_export, "demo": preflight_demo, "serve": preflight_serve}
# Commands that never touch TensorFlow: check, report, backbones, cache.
NEEDS_TENSORFLOW = {"fit", "lr-find", "predict", "evaluate", "inspect", "export", "demo", "serve"}
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def _run(args) -> int:
    import warnings

    # graftkit refuses images over its pixel limits itself, with a message naming the file;
    # Pillow's warning about the same images would reach the console (a server's log) as noise.
    warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb")
    preflight = PREFLIGHT.get(args.command)
    if preflight is not None:
        preflight(args)
    if args.command in NEEDS_TENSORFLOW:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import_tensorflow()
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The ``graft`` command. Every user error ends in one line on stderr and an exit code."""
    name = "graft"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        name = f"graft {args.command}"
        from graftkit.frozen import runtimes

        runtimes.forced_engine()  # a typo in the engine settings stops before any work
        runtimes.wanted_precision()
        return _run(args)
    except GraftError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = (" (run the same command again to resume: fine-tuning goes on from its last"
                " finished epoch; phase 1 on cached features reruns in seconds)"
                if name in ("graft fit", "graft demo") else "")
        print(f"{name}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `graft predict ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        from graftkit.files import is_disk_full

        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{name}: error: no space left on the disk{where}: free some space, then run the "
              "same command again", file=sys.stderr)
        return DiskFullError.exit_code


if __name__ == "__main__":
    sys.exit(main())

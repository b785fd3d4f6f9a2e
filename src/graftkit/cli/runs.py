"""``graft predict``, ``evaluate``, ``report``, ``export`` and ``serve``: what a finished run is used for."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graftkit import defaults
from graftkit.cli.common import Command, add_unsafe, table
from graftkit.errors import DataError, UsageError


def _progress(done: int, total: int) -> None:
    """On stderr, so that stdout stays clean JSON/CSV."""
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        end = "\n" if done == total else ""
        print(f"\rpredicting [{'=' * filled}{'.' * (width - filled)}] {done}/{total}",
              end=end, file=sys.stderr, flush=True)


def preflight_predict(args) -> None:
    from graftkit.files import prepare_output_dir, prepare_output_file
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
    if args.explain:
        if args.tta:
            raise UsageError("--explain explains each image as it is, not averaged with its "
                             "mirror image: drop --tta (or run the two apart)")
        prepare_output_dir(args.explain, "--explain")


def cmd_predict(args) -> int:
    from graftkit.classifier import load
    from graftkit.data.inputs import gather

    clf = load(args.run_dir, args.unsafe)
    images = gather(args.paths, clf.image_size, check=False)  # checked as they are decoded
    if not images.names:
        raise UsageError("no readable image among the given paths")
    top_k = min(args.top_k, len(clf.classes))
    explained, heatmaps = None, []
    if args.explain:
        explained = clf.explain(images, top_k=top_k, batch_size=args.batch_size,
                                reject=args.reject, progress=_progress)
        preds = [e.prediction for e in explained]
        heatmaps = _write_heatmaps(explained, Path(args.explain))
    else:
        preds = clf.predict(images, top_k=top_k, batch_size=args.batch_size, tta=args.tta,
                            progress=_progress, reject=args.reject)
    for item in images.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if not preds:
        raise UsageError("no readable image among the given paths")
    if clf.open_set_note:
        print(f"note: {clf.open_set_note}", file=sys.stderr)
    why = list(zip(explained, heatmaps)) if explained is not None else None
    if args.format == "json":
        records = [p.as_dict() for p in preds]
        for record, (e, files) in zip(records, why or []):
            record.update(heatmaps=files, closest=_closest_rows(e.closest))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif args.format == "csv":
        text = _csv_text(clf, preds, why)
    elif clf.multi_label:
        rows = [[p.path, str(p), "" if p.ood_score is None else f"{p.ood_score:.3f}"]
                for p in preds]
        text = table(rows, ["path", "labels (above their thresholds)", "ood score"]) + "\n"
    else:
        rows = [[p.path, str(p), f"{p.probability:.4f}",
                 ", ".join(f"{lab} {q:.3f}" for lab, q in p.top_k),
                 "" if p.ood_score is None else f"{p.ood_score:.3f}"] for p in preds]
        text = table(rows, ["path", "label", "probability", f"top {top_k}",
                            "ood score"]) + "\n"
        unknown = sum(not p.known for p in preds)
        if unknown:
            text += (f"{unknown} of {len(preds)} images unlike the training images (score above "
                     f"{clf.threshold(args.reject):.4g}): answered unknown with the closest "
                     "class\n")
    if explained is not None and args.format == "table":
        text += _closest_table(explained)
    if args.output:
        from graftkit.files import write_text

        write_text(Path(args.output), text)
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if explained is not None:
        n = sum(len(files) for files in heatmaps)
        print(f"wrote {n} heatmap(s) to {args.explain}", file=sys.stderr)
    return 0


def _csv_text(clf, preds, why: list | None) -> str:
    """``graft predict --format csv``: a row per image; label sets and explanations as extra
    columns."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    multi = clf.multi_label
    w.writerow(["path", "label", "probability", "top_k", "known", "ood_score"]
               + (["labels", *[f"p_{c}" for c in clf.classes]] if multi else [])
               + (["heatmaps", "closest"] if why is not None else []))
    for i, p in enumerate(preds):
        w.writerow([p.path, p.label, f"{p.probability:.6f}",
                    ";".join(f"{lab}:{q:.6f}" for lab, q in p.top_k),
                    str(p.known).lower(), "" if p.ood_score is None else f"{p.ood_score:.6g}"]
                   + ([" ".join(p.labels or []),
                       *[f"{(p.probabilities or {})[c]:.6f}" for c in clf.classes]]
                      if multi else [])
                   + ([";".join(why[i][1].values()),
                       ";".join(f"{c['path']}|{c['label']}|{c['similarity']:.4f}"
                                for c in _closest_rows(why[i][0].closest) or [])]
                      if why is not None else []))
    return buf.getvalue()


def _write_heatmaps(explained, folder: Path) -> list[dict[str, str]]:
    """``FOLDER/<image>.<label>.jpg``: each image with its heatmap laid over it; the files
    written per image (label -> path). Two images of one name get ``-1``, ``-2``..."""
    from graftkit.files import atomic_write
    from graftkit.outputs.heatmaps import jpeg_bytes, overlay

    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    out = []
    for e in explained:
        stem = Path(e.prediction.path).stem or "image"
        name, n = stem, 0
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        files = {}
        for label, heat in e.heatmaps.items():
            path = folder / f"{name}.{label}.jpg"
            data = jpeg_bytes(overlay(e.image, heat))
            atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
            files[label] = str(path)
        out.append(files)
    return out


def _closest_rows(closest: list[dict] | None) -> list[dict] | None:
    return None if closest is None else [
        {"path": c["path"], "label": c["label"], "similarity": c["similarity"]} for c in closest]


def _closest_table(explained) -> str:
    if all(e.closest is None for e in explained):
        return ("closest training images: this run has none stored (made by an older "
                "graftkit): run graft fit again to get them\n")
    rows = [[e.prediction.path, c["label"], f"{c['similarity']:.3f}", c["path"]]
            for e in explained for c in e.closest or []]
    return "\nclosest training images\n" + table(rows, ["image", "label", "similarity",
                                                        "training image"]) + "\n"


def _print_label_set_scores(result: dict) -> int:
    """``graft evaluate`` of a multi-label run: mAP, F1s, then a row per label."""
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"mAP {num(result['map'])} ({result['labels_scored']} labels), example-based F1 "
          f"{result['example_f1']:.4f}, micro F1 {result['micro_f1']:.4f}, macro F1 "
          f"{result['macro_f1']:.4f}, subset accuracy {result['subset_accuracy']:.4f} on "
          f"{result['num_images']} images of {result['data']} (at the run's thresholds)")
    if "tta" in result:
        print(f"with --tta: mAP {num(result['tta']['map'])} (gain {result['tta']['gain']:+.4f})")
    rejected = result["rejected"]
    if rejected["share"] is not None:
        print(f"unknown: {rejected['count']} of {result['num_images']} images "
              f"({rejected['share']:.1%}) score above the run's threshold")
    rows = [[r["label"], num(r["average_precision"]), f"{r['threshold']:.3f}",
             num(r["precision"]), num(r["recall"]), r["positives"], r["predicted"]]
            for r in result["per_label"]]
    print(table(rows, ["label", "AP", "threshold", "precision", "recall", "images", "given"]))
    for item in result["skipped_files"]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
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
    if "map" in result:
        return _print_label_set_scores(result)
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
    print(table(rows, ["class", "precision", "recall", "f1", "images"]))
    classes = list(result["per_class"])
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(table([[c, *row] for c, row in zip(classes, result["confusion_matrix"])],
                ["", *classes]))
    for item in result["skipped_files"]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from graftkit.outputs.report import build_report

    print(f"wrote {build_report(args.run_dir)}")
    return 0


def preflight_export(args) -> None:
    from graftkit.deploy.export import check_request
    from graftkit.outputs.run import read_run

    check_request(args.format, args.quantize)  # a combination that cannot be: before TensorFlow
    read_run(args.run_dir)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: pass a folder for the export")


def cmd_export(args) -> int:
    from graftkit.deploy.export import export, summary

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
    if args.ort_web is not None:
        from graftkit.serve.browser import ORT_FILES, ORT_VERSION, ort_web_dir

        if ort_web_dir(args.ort_web) != Path(args.ort_web):
            raise UsageError(f"--ort-web {args.ort_web}: ONNX Runtime Web's files are not all "
                             f"there ({', '.join(ORT_FILES)}): npm install "
                             f"onnxruntime-web@{ORT_VERSION} and pass its "
                             "node_modules/onnxruntime-web/dist")
    read_run(args.run_dir)
    if args.data:
        check_data_path(args.data)
    if args.inbox and not Path(args.inbox).is_dir():
        raise DataError(f"--inbox {args.inbox}: no such folder (a folder of new images)")
    from graftkit.serve.server import bind

    args.sock = bind(args.host, args.port)  # before TensorFlow loads: a taken port is told at once


def cmd_serve(args) -> int:
    from graftkit.serve.server import serve

    return serve(args.run_dir, args.data, args.host, args.port, args.max_upload_mb, args.unsafe,
                 log=lambda line: print(line, flush=True), sock=args.sock,
                 max_pixels=args.max_pixels, max_files=args.max_files,
                 allow_hosts=args.allow_host or (), quiet=args.quiet, inbox=args.inbox,
                 ort_web=args.ort_web)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--explain", metavar="DIR",
                   help="also write each image with a heatmap of where the model looked "
                        "(DIR/<image>.<label>.jpg) and list the closest training images")
    add_unsafe(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("data_dir")
    p.add_argument("--tta", action="store_true",
                   help="also score with test-time augmentation (mirror image) and report its gain")
    add_unsafe(p)
    p.add_argument("--format", choices=("table", "json"), default="table")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("savedmodel", "tflite", "onnx", "coreml"),
                   default="savedmodel")
    p.add_argument("--quantize", choices=("auto", "none", "float16", "int8"), default="auto",
                   help="tflite: none|float16|int8; onnx: none|int8 (weights); coreml: "
                        "none|float16 (compute precision); savedmodel: none; auto follows the "
                        "run: tflite int8 for a run whose frozen part ran in int8, else none")
    p.add_argument("--out", help="folder for the export (default RUN_DIR/export/FORMAT[-Q])")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--data", help="the data folder to review (default: the run's own)")
    p.add_argument("--inbox", metavar="FOLDER",
                   help="a folder of new, unlabelled images: the inbox page lists them with the "
                        "model's suggestion, least sure first, and files the ones you accept "
                        "into the data's training folders")
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
    p.add_argument("--ort-web", metavar="DIR",
                   help="ONNX Runtime Web's dist folder for /browser/, which runs the run's ONNX "
                        "export in the browser (default: $GRAFTKIT_ORT_WEB, or the one make "
                        "installs in web/node_modules)")
    add_unsafe(p)


COMMANDS = (
    Command(
        "predict", "predict the class of images",
        run=cmd_predict, arguments=_predict_arguments,
        preflight=preflight_predict, tensorflow=True,
        examples="""
graft predict runs/photos photo.jpg
graft predict runs/photos new_photos/ --top-k 3 --format json
graft predict runs/photos new_photos/ --tta --format csv --output predictions.csv
""",
    ),
    Command(
        "evaluate", "score a run on labelled images",
        run=cmd_evaluate, arguments=_evaluate_arguments,
        preflight=preflight_evaluate, tensorflow=True,
        examples="""
graft evaluate runs/photos photos/            # photos/val/ when it has train/ and val/
graft evaluate runs/photos test_photos/ --format json
graft evaluate runs/photos test_photos/ --tta   # and the gain of test-time augmentation
""",
    ),
    Command(
        "report", "rebuild RUN_DIR/report.html (self-contained)",
        run=cmd_report, arguments=_report_arguments,
        examples="""
graft report runs/photos
""",
    ),
    Command(
        "export", "export for TF Serving, TFLite (MediaPipe), ONNX (browsers) or Core ML, "
                  "verified by that runtime",
        run=cmd_export, arguments=_export_arguments,
        preflight=preflight_export, tensorflow=True,
        examples="""
graft export runs/photos --format savedmodel
graft export runs/photos --format tflite --quantize int8
graft export runs/photos --format onnx --out deploy/
graft export runs/photos --format coreml
""",
    ),
    Command(
        "serve", "the run as a local web app and HTTP API, with a page to review its data",
        run=cmd_serve, arguments=_serve_arguments,
        preflight=preflight_serve, tensorflow=True,
        examples="""
graft serve runs/photos                     # http://127.0.0.1:8000/ (try page), /review, /predict
graft serve runs/photos --data photos/ --port 8080
graft serve runs/photos --data photos/ --inbox new_photos/   # label new images at /inbox
curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'
""",
    ),
)

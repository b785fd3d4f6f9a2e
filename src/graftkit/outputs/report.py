"""``report.html``: one self-contained page (images embedded, no network) to see a run.

Run card, training curves, confusion matrix, per-class precision/recall/F1, the most confused
class pairs (with their images), and the validation images with the highest loss (fastai's "top
losses"), each with its true label, predicted label and probability, the heatmap of where the
model looked and the closest training images (from ``explain/``, written at fit time, so the
page needs neither the model nor the data folder); the training and validation labels that look
wrong, each with the class suggested instead.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from graftkit.frozen.runtimes import engine_label
from graftkit.outputs.compare import line as compared
from graftkit.outputs.svg import bar_chart

REPORT_FILE = "report.html"
TOP_LOSSES = 16
PAIRS_SHOWN = 5  # most confused pairs whose images are shown
PAIR_IMAGES = 3  # images per pair
LABEL_ISSUES_SHOWN = 32
THUMBNAIL = 160

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
max-width:1200px}
.charts{display:flex;gap:16px;flex-wrap:wrap}figure.chart{margin:4px 0;max-width:380px}
figcaption{font-size:12px;color:#555}
h3{font-size:14px;margin:14px 0 6px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
.card td{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}
.tile{width:170px;font-size:12px}.tile .n{white-space:nowrap}.tile .f{overflow-wrap:anywhere}
.tile img{width:160px;height:160px;object-fit:cover;border:3px solid #bbb}
.tile.wrong img{border-color:#c33}.bad{color:#c33}
.tile.why{width:340px}.tile img.heat{border-color:#bbb;margin-left:4px}
.closest{margin-top:3px}.near{display:inline-block;width:72px;vertical-align:top;
overflow-wrap:anywhere}.near img{width:64px;height:64px;border:1px solid #ccc;display:block}
.muted{color:#777}
.cm td.d{background:#dbeafe;font-weight:600}
"""


def _uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _file_uri(path: Path, mime: str = "image/png") -> str | None:
    return _uri(path.read_bytes(), mime) if path.is_file() else None


def _thumbnail(path: str) -> str | None:
    from graftkit.data.images import jpeg_thumbnail

    try:
        return _uri(jpeg_thumbnail(path, THUMBNAIL))
    except Exception:  # noqa: BLE001 - moved or changed since the run: shown as missing
        return None


def _e(value) -> str:
    return html.escape(str(value))


def _run_card(m: dict) -> str:
    rows = [
        ("data", f"{m.get('data', '?')} ({m.get('split', '')})"),
        ("classes", ", ".join(m["classes"])),
        ("images", f"{m['num_train']} training, {m['num_val']} validation, "
                   f"{len(m['skipped_files'])} skipped"),
        ("backbone", f"{m['backbone']} at {m['image_size']} px, preprocessing "
                     f"{m.get('preprocessing', '')}"),
    ]
    score = "accuracy"
    if m.get("multi_label"):
        score = "mAP"
        rows[1] = ("labels", ", ".join(m["classes"]) + " (several per image)")
        rows.append(("final val mAP", f"{m['multi_label']['map']:.4f} (example-based F1 "
                                      f"{m['multi_label']['example_f1']:.4f})"))
    else:
        rows.append(("final val accuracy", f"{m['val_accuracy']:.4f} (balanced "
                                           f"{m.get('balanced_accuracy', float('nan')):.4f})"))
    frozen = m.get("frozen_outputs")
    if frozen and "seconds" in frozen:
        rows.append(("frozen pass", f"{frozen['computed']:,} outputs computed by "
                                    f"{engine_label(frozen['engine'], frozen.get('precision', 'f32'))}, "
                                    f"{frozen['from_cache']:,} read from the "
                                    f"cache, {frozen['seconds']:.1f} s"))
    for p in m["phases"]:
        rows.append((f"phase {p['name']}", f"{p['epochs']} epochs, {p['seconds']:.1f} s, best val "
                                          f"{score} {p['best_val_accuracy']:.4f}. {p['note']}"))
    mode = m.get("mode")
    if mode:
        rows.append((f"mode {mode['requested']}", f"chose {mode['chosen'].replace('_', '-')}: "
                                                  f"{mode['reason']}"))
        if mode.get("unfreeze_reason") and mode["unfreeze_reason"] != "given":
            rows.append(("unfreeze auto", f"{mode['unfreeze']}: {mode['unfreeze_reason']}"))
        if mode.get("image_size_reason") and mode["image_size_reason"] != "given":
            rows.append(("image size", f"{mode['image_size']} px: {mode['image_size_reason']}"))
    rows.append(("total time", f"{m.get('total_seconds', 0):.1f} s"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())))
    check = m.get("check", {})
    if check:
        found = check.get("findings", [])
        rows.append(("data check", f"{check.get('status')}"
                     + (": " + "; ".join(f.get("message", "") for f in found) if found else "")))
    body = "".join(f"<tr><th class=l>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class=card>{body}</table>" + _settings(m.get("options", {}))


def _settings(options: dict) -> str:
    """The options the run was made with, one row each (``graftkit.fit``'s keywords)."""
    if not options:
        return ""
    rows = "".join(f"<tr><th class=l>{_e(k)}</th><td class=l>"
                   f"{_e(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))}</td></tr>"
                   for k, v in sorted(options.items()))
    return f"<h3>Settings</h3><table class=card id=settings>{rows}</table>"


def _per_class(m: dict) -> str:
    head = "<tr><th class=l>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>"
    body = "".join(
        f"<tr><td class=l>{_e(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for c, v in m["per_class"].items())
    return f"<table>{head}{body}</table>"


def _confusion(m: dict) -> str:
    classes, cm = m["classes"], m["confusion_matrix"]
    head = "<tr><th class=l>true \\ predicted</th>" + "".join(f"<th>{_e(c)}</th>" for c in classes)
    rows = "".join(
        f"<tr><th class=l>{_e(c)}</th>" + "".join(
            f"<td class={'d' if i == j else ''}>{n}</td>" for j, n in enumerate(row)) + "</tr>"
        for i, (c, row) in enumerate(zip(classes, cm)))
    return f"<table class=cm>{head}</tr>{rows}</table>"


def confused_pairs(m: dict, limit: int = 10) -> list[tuple[str, str, int]]:
    classes, cm = m["classes"], m["confusion_matrix"]
    pairs = [(classes[i], classes[j], n) for i, row in enumerate(cm) for j, n in enumerate(row)
             if i != j and n > 0]
    return sorted(pairs, key=lambda t: -t[2])[:limit]


def _pairs(m: dict) -> str:
    pairs = confused_pairs(m)
    if not pairs:
        return "<p class=muted>no validation image was misclassified.</p>"
    body = "".join(f"<tr><td class=l>{_e(a)}</td><td class=l>{_e(b)}</td><td>{n}</td></tr>"
                   for a, b, n in pairs)
    return ("<table><tr><th class=l>true</th><th class=l>predicted as</th><th>images</th></tr>"
            f"{body}</table>")


def _image_tag(path: str) -> str:
    uri = _thumbnail(path)
    return (f"<img src='{uri}' alt='{_e(Path(path).name)}'>" if uri else
            "<div class=muted>(image no longer readable)</div>")


class Why:
    """The run's fit-time explanations (``explain/``): each shown image's heatmap and closest
    training images, as embedded images. Empty for runs made before them."""

    def __init__(self, run_dir: Path):
        from graftkit.outputs.closest import Thumbnails
        from graftkit.outputs.heatmaps import read_explanations

        self.run_dir = run_dir
        self.index = read_explanations(run_dir)
        self._thumbs = Thumbnails(run_dir)

    def note(self, looked_for: str = "the class it predicted") -> str:
        if not self.index:
            return ("<p class=muted>No heatmaps: this run has none stored (made by an older "
                    "graftkit); graft fit again to get them.</p>")
        return (f"<p class=muted>Beside each image: where the model looked for {looked_for} "
                "(Grad-CAM++ on the base's last feature map: red is where it found the most), "
                "and the training images it resembles most.</p>")

    def heatmap(self, path: str, label: str | None = None) -> str:
        from graftkit.outputs.heatmaps import EXPLAIN_DIR

        entry = self.index.get(path)
        if not entry or not entry["heatmaps"]:
            return ""
        label = label if label in entry["heatmaps"] else next(iter(entry["heatmaps"]))
        uri = _file_uri(self.run_dir / EXPLAIN_DIR / entry["heatmaps"][label], "image/jpeg")
        if uri is None:
            return ""
        return f"<img class=heat src='{uri}' alt='where it looked for {_e(label)}' " \
               f"title='where the model looked for {_e(label)}'>"

    def closest(self, path: str) -> str:
        entry = self.index.get(path)
        if not entry or not entry.get("closest"):
            return ""
        cells = []
        for c in entry["closest"]:
            uri = self._thumb(int(c["index"]))
            img = f"<img src='{uri}' alt=''>" if uri else ""
            cells.append(f"<span class=near title='{_e(Path(c['path']).name)}'>{img}"
                         f"{_e(c['label'])} {c['similarity']:.2f}</span>")
        return (f"<div class=closest><div class=muted>closest training images</div>"
                f"{''.join(cells)}</div>")

    def _thumb(self, index: int) -> str | None:
        try:
            return _uri(self._thumbs.jpeg(index))
        except (OSError, IndexError):
            return None


def shown_top_losses(predictions: list[dict]) -> tuple[list[dict], list[dict], int, int]:
    """The report's top losses: ``(wrong shown, right shown, wrong, right)``; wrong ones first
    (highest loss first), then the right ones it was least sure of."""
    by_loss = sorted(predictions, key=lambda r: -float(r["loss"]))
    wrong = [r for r in by_loss if r["label"] != r["predicted"]]
    right = [r for r in by_loss if r["label"] == r["predicted"]]
    shown_wrong = wrong[:TOP_LOSSES]
    shown_right = right[:max(TOP_LOSSES - len(shown_wrong), TOP_LOSSES // 2)]
    return shown_wrong, shown_right, len(wrong), len(right)


def confused_examples(m: dict, predictions: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """The most confused pairs' images: ``(true, predicted as, highest-loss images)``."""
    out = []
    for a, b, _ in confused_pairs(m, PAIRS_SHOWN):
        rows = [r for r in predictions if r["label"] == a and r["predicted"] == b]
        out.append((a, b, sorted(rows, key=lambda r: -float(r["loss"]))[:PAIR_IMAGES]))
    return out


def explained_paths(m: dict, predictions: list[dict]) -> list[str]:
    """The validation images the report shows with a heatmap, in order, once each."""
    if m.get("multi_label"):
        rows = sorted(predictions, key=lambda r: -float(r["loss"]))[:TOP_LOSSES]
    else:
        wrong, right, _, _ = shown_top_losses(predictions)
        rows = wrong + right + [r for _, _, rs in confused_examples(m, predictions) for r in rs]
    return list(dict.fromkeys(r["path"] for r in rows))


def _tile(r: dict, why: Why) -> str:
    img = _image_tag(r["path"]) + why.heatmap(r["path"], r["predicted"])
    wrong = r["label"] != r["predicted"]
    return (f"<div class='tile{' wrong' if wrong else ''}{' why' if why.index else ''}'>{img}"
            f"<div>true <b>{_e(r['label'])}</b></div>"
            f"<div class={'bad' if wrong else ''}>predicted {_e(r['predicted'])} "
            f"<span class=n>({float(r['probability']):.3f})</span></div>"
            f"<div class=muted><span class=n>true-class p {float(r['true_probability']):.3f}"
            f"</span> &middot; <span class=n>loss {float(r['loss']):.3f}</span> &middot; "
            f"<span class=f>{_e(Path(r['path']).name)}</span></div>{why.closest(r['path'])}"
            "</div>")


def _top_losses(predictions: list[dict], why: Why) -> str:
    """Wrong predictions first (highest loss first), then the right ones it was least sure of."""
    shown_wrong, shown_right, wrong, right = shown_top_losses(predictions)
    parts = [why.note(), f"<h3>Wrong predictions ({wrong} of {len(predictions)}"
             + (f", the {len(shown_wrong)} with the highest loss" if wrong > len(shown_wrong)
                else "") + ")</h3>"]
    parts.append(f"<div class=grid id=wrong>{''.join(_tile(r, why) for r in shown_wrong)}</div>"
                 if shown_wrong else "<p class=muted>every validation image was predicted "
                                     "right.</p>")
    parts.append(f"<h3>Right, but least confident ({len(shown_right)} of {right}, the "
                 "lowest probability for the true class first)</h3>")
    parts.append("<div class=grid id=least-confident>"
                 f"{''.join(_tile(r, why) for r in shown_right)}</div>")
    return f"<div id=top-losses>{''.join(parts)}</div>"


def _pair_images(m: dict, predictions: list[dict], why: Why) -> str:
    """The images behind the most confused pairs, each with where the model looked."""
    parts = [f"<h3>{_e(a)} predicted as {_e(b)}</h3>"
             f"<div class=grid>{''.join(_tile(r, why) for r in rows)}</div>"
             for a, b, rows in confused_examples(m, predictions) if rows]
    return f"<div id=confused-images>{''.join(parts)}</div>" if parts else ""


def _issue_tile(issue) -> str:
    uri = _thumbnail(issue.path)
    name = Path(issue.path).name
    img = f"<img src='{uri}' alt='{_e(name)}'>" if uri else \
        "<div class=muted>(image no longer readable)</div>"
    return (f"<div class='tile wrong'>{img}<div class=n>#{issue.rank} &middot; {_e(issue.split)}"
            f"</div><div><b>{_e(issue.given)}</b> &rarr; <b>{_e(issue.suggested)}</b></div>"
            f"<div class=muted><span class=n>p {issue.p_given:.3f} &rarr; {issue.p_suggested:.3f}"
            f"</span> &middot; <span class=f>{_e(name)}</span></div></div>")


def _label_issues(run_dir: Path, m: dict) -> str:
    """The likeliest wrong labels, each as "given -> suggested" with both probabilities."""
    from graftkit.labels.issues import read_csv

    info = m.get("label_issues")
    if not info:
        return ("<p class=muted>not looked for in this run (--label-folds 0, or no cached "
                "features): graft check DATA --labels finds them</p>")
    issues = read_csv(run_dir / (info.get("file") or "label_issues.csv"))
    intro = (f"<p>{info['count']} of {info['checked']} training and validation labels look "
             f"wrong: {info['folds']} heads, each trained on the images the others score, "
             "disagree with them (confident learning: another class passes its own mean "
             "confidence, and the given class is not the top one). Lowest probability of the "
             f"given label first; every finding is in <code>{_e(info.get('file'))}</code>, and "
             "<code>graft serve RUN --data DATA</code> moves them with undo.</p>")
    if not issues:
        return intro
    shown = issues[:LABEL_ISSUES_SHOWN]
    more = (f"<p class=muted>{len(issues) - len(shown)} more in {_e(info.get('file'))}</p>"
            if len(issues) > len(shown) else "")
    return (intro + f"<div class=grid id=label-issues>{''.join(map(_issue_tile, shown))}</div>"
            + more)


def _reliability(bins: list[dict], title: str) -> str:
    bars = [(b["low"], b["high"], b["accuracy"], "#4a7ab5") for b in bins]
    chart = bar_chart(bars, [(0, 0, 1, 1, "#999", True)], "confidence (top-1 probability)",
                      "accuracy")
    return f"<figure class=chart><figcaption>{_e(title)}</figcaption>{chart}</figure>"


def _calibration(m: dict) -> str:
    c = m.get("calibration")
    if not c:
        return "<p class=muted>this run predates calibration: run graft fit again.</p>"
    text = (f"<p>{_e(c['reason'])}. Expected calibration error ({c['bins']} bins) "
            f"<b>{c['ece_before']:.4f}</b> before, <b>{c['ece_after']:.4f}</b> after; "
            f"negative log-likelihood {c['nll_before']:.4f} / {c['nll_after']:.4f}; measured on "
            "validation images the temperature was not fitted on (each half with the other "
            "half's temperature). Bars below the dashed line: over-confident.</p>")
    return (f"<div id=calibration>{text}<div class=charts>"
            + _reliability(c["reliability_before"], "before")
            + _reliability(c["reliability_after"], _after_title(c))
            + "</div></div>")


def _after_title(c: dict) -> str:
    if c.get("applied", True):
        return f"after (T = {c['temperature']:.3f})"
    fitted = c.get("fitted_temperature")
    return ("after: no temperature applied, the same probabilities as before ("
            + (f"the fitted T = {fitted:.3f} did not help on held-out images)" if fitted
               else "too few images to fit one)"))


def _open_set(m: dict, predictions: list[dict]) -> str:
    o = m.get("open_set")
    scores = [float(r["ood_score"]) for r in predictions if r.get("ood_score")]
    if not o or not scores:
        return "<p class=muted>this run predates the open-set score: run graft fit again.</p>"
    top = max(max(scores), o["threshold"]) * 1.05 or 1.0
    counts = [0] * 30
    for v in scores:
        counts[min(int(v / top * 30), 29)] += 1
    peak = max(counts)
    bars = [(i / 30, (i + 1) / 30, n / peak, "#4a7ab5" if (i + 0.5) / 30 * top <= o["threshold"]
             else "#c0504d") for i, n in enumerate(counts) if n]
    x = o["threshold"] / top
    chart = bar_chart(bars, [(x, 0, x, 1, "#333", True)], f"{o['method']} score",
                      "validation images", x_range=(0.0, top), y_range=(0.0, float(peak)))
    held = o.get("val_rejected_held_out")
    text = (f"<p>Score: <b>{_e(o['method'])}</b> ({_e(o['formula'])}); higher = less like the "
            f"training images. Threshold <b>{o['threshold']:.4g}</b> (dashed) keeps "
            f"{1 - o['val_rejected']:.1%} of the validation images"
            + ("" if held is None else f", {1 - held:.1%} of those it was not chosen on")
            + ". Images above it are answered <i>unknown</i> by graft predict (--reject).</p>")
    return f"<div id=open-set>{text}<figure class=chart>{chart}</figure></div>"


def _headline(m: dict) -> str:
    test = m.get("test")
    line = (f"<p>test accuracy <b id=test-accuracy>{test['accuracy']:.4f}</b> on "
            f"{test['num_images']} held-out images (scored once, nothing chosen on them)</p>"
            if test else "")
    used = m.get("val_used_for")
    note = (f" (they chose {_e(used)}: optimistic"
            + ("" if test else "; a test/ folder beside train/ or --test gives a figure nothing "
                               "was chosen on") + ")") if used else ""
    previous = m.get("previous_run")  # a refit: its model and the last run's, image by image
    against = (f"<p class=muted id=previous-run>against the last run: {_e(compared(previous))}"
               "</p>" if previous else "")
    return (line + f"<p class=muted>final validation accuracy <b id=accuracy>"
            f"{m['val_accuracy']:.4f}</b> on {m['num_val']} images{note}</p>" + against)


def _test(m: dict) -> str:
    test = m.get("test")
    if not test:
        return ""
    scored = {**m, "confusion_matrix": test["confusion_matrix"], "per_class": test["per_class"]}
    return (f"<div id=test><h2>Held-out test images ({test['num_images']}, from "
            f"{_e(test['data'])})</h2><p>accuracy <b>{test['accuracy']:.4f}</b>, balanced "
            f"{test['balanced_accuracy']:.4f}; {test['rejected']:.1%} answered unknown</p>"
            f"<h3>Confusion matrix (test)</h3>{_confusion(scored)}"
            f"<h3>Per-class precision, recall, F1 (test)</h3>{_per_class(scored)}</div>")


def _label_set_headline(m: dict) -> str:
    s = m["multi_label"]
    return (f"<p>validation mAP <b id=map>{s['map']:.4f}</b> (macro, {s['labels_scored']} "
            f"labels), example-based F1 <b id=example-f1>{s['example_f1']:.4f}</b>, micro F1 "
            f"{s['micro_f1']:.4f}, macro F1 {s['macro_f1']:.4f}, subset accuracy "
            f"{s['subset_accuracy']:.4f} on {m['num_val']} images</p><p class=muted>"
            f"{s['labels_per_image']:.2f} labels per image, {s['predicted_per_image']:.2f} given "
            "by the model. The F1s decide each half of the images with thresholds chosen on the "
            "other half; the stored thresholds (below) use all of them.</p>")


def _per_label(s: dict) -> str:
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    head = ("<tr><th class=l>label</th><th>AP</th><th>threshold</th><th>precision</th>"
            "<th>recall</th><th>images</th><th>given</th></tr>")
    body = "".join(
        f"<tr><td class=l>{_e(r['label'])}</td><td>{num(r['average_precision'])}</td>"
        f"<td>{r['threshold']:.3f}</td><td>{num(r['precision'])}</td><td>{num(r['recall'])}</td>"
        f"<td>{r['positives']}</td><td>{r['predicted']}</td></tr>" for r in s["per_label"])
    return f"<table id=per-label>{head}{body}</table>"


def _missed_added(predictions: list[dict]) -> str:
    missed: dict[str, int] = {}
    added: dict[str, int] = {}
    for r in predictions:
        truth, said = set(r["labels"].split()), set(r["predicted"].split())
        for x in truth - said:
            missed[x] = missed.get(x, 0) + 1
        for x in said - truth:
            added[x] = added.get(x, 0) + 1
    rows = "".join(f"<tr><td class=l>{_e(x)}</td><td>{missed.get(x, 0)}</td>"
                   f"<td>{added.get(x, 0)}</td></tr>"
                   for x in sorted(set(missed) | set(added),
                                   key=lambda x: -(missed.get(x, 0) + added.get(x, 0))))
    if not rows:
        return "<p class=muted>every validation image got exactly its labels.</p>"
    return ("<table id=missed-added><tr><th class=l>label</th><th>missed</th><th>added</th>"
            f"</tr>{rows}</table>")


def _label_set_tile(r: dict, why: Why) -> str:
    img = _image_tag(r["path"]) + why.heatmap(r["path"])
    truth, said = set(r["labels"].split()), set(r["predicted"].split())
    chips = " ".join(
        f"<span class={'bad' if x not in truth else ''}>{_e(x)}</span>" for x in sorted(said))
    return (f"<div class='tile{' wrong' if truth != said else ''}'>{img}<div>labels "
            f"<b>{_e(' '.join(sorted(truth)) or '(none)')}</b></div><div>given {chips or '(none)'}"
            f"</div><div class=muted><span class=n>loss {float(r['loss']):.3f}</span> &middot; "
            f"<span class=f>{_e(Path(r['path']).name)}</span></div>{why.closest(r['path'])}"
            "</div>")


def _label_calibration(m: dict) -> str:
    c = m.get("calibration") or {}
    rows = c.get("per_label")
    if not rows:
        return "<p class=muted>no calibration recorded.</p>"

    def num(r, key):
        return f"{r[key]:.4f}" if key in r else "-"

    body = "".join(
        f"<tr><td class=l>{_e(r['label'])}</td><td>{num(r, 'nll_before')}</td>"
        f"<td>{num(r, 'nll_after')}</td><td>{num(r, 'ece_before')}</td>"
        f"<td>{num(r, 'ece_after')}</td><td>{r['temperature']:.3f}"
        f"{'' if r['applied'] else ' (not kept)' if 'fitted_temperature' in r else ''}</td></tr>"
        for r in rows)
    return (f"<p>{_e(c.get('reason', ''))}. After: each half of the validation images under the "
            "temperature fitted on the other half; '-': too few positives to measure.</p>"
            "<table id=label-calibration><tr><th class=l>label</th><th>log-loss</th><th>after"
            "</th><th>ECE</th><th>after</th><th>T</th></tr>" + body + "</table>")


def _label_set_body(m: dict, predictions: list[dict], run_dir: Path) -> str:
    from graftkit.outputs.run import PR_CURVES_FILE

    by_loss = sorted(predictions, key=lambda r: -float(r["loss"]))[:TOP_LOSSES]
    curves = _file_uri(run_dir / PR_CURVES_FILE)
    why = Why(run_dir)
    return (f"<h2>Per label: average precision, threshold, precision and recall</h2>"
            f"{_per_label(m['multi_label'])}"
            "<h2>Precision-recall curves (validation; the dot: each label's threshold)</h2>"
            + (f"<img id=pr-curves src='{curves}' alt='precision-recall curves'>" if curves
               else f"<p class=muted>{PR_CURVES_FILE} is missing</p>")
            + "<h2>Calibration: a temperature per label, kept where it helps</h2>"
            + _label_calibration(m)
            + f"<h2>Labels most often missed and added (validation)</h2>"
            f"{_missed_added(predictions)}"
            f"<h2>Unknown images: the open-set score of the validation images</h2>"
            f"{_open_set(m, predictions)}"
            f"<h2>Top losses: the validation images whose labels the model fits worst</h2>"
            f"{why.note('its likeliest label')}"
            f"<div class=grid id=top-losses>{''.join(_label_set_tile(r, why) for r in by_loss)}"
            "</div>")


def build_report(run_dir: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` from the run's files (atomic)."""
    from graftkit.files import write_text
    from graftkit.outputs.run import CURVES_FILE, METRICS_FILE, read_predictions

    run_dir = Path(run_dir)
    if metrics is None:
        from graftkit.errors import RunError

        try:
            metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RunError(f"{run_dir} is not a finished graftkit run (no readable "
                           f"{METRICS_FILE})") from None
    predictions = read_predictions(run_dir)
    curves = _file_uri(run_dir / CURVES_FILE)
    title = f"graftkit run: {Path(run_dir).resolve().name}"
    curves_html = (f"<img id=curves src='{curves}' alt='training curves'>" if curves else
                   "<p class=muted>curves.png is missing</p>")
    if metrics.get("multi_label"):
        headline = _label_set_headline(metrics)
        details = _label_set_body(metrics, predictions, run_dir)
    else:
        why = Why(run_dir)
        headline = f"{_headline(metrics)}\n{_test(metrics)}"
        details = f"""<h2>Confusion matrix (validation)</h2>{_confusion(metrics)}
<h2>Per-class precision, recall, F1</h2>{_per_class(metrics)}
<h2>Most confused pairs</h2>{_pairs(metrics)}{_pair_images(metrics, predictions, why)}
<h2>Calibration: are the probabilities right?</h2>{_calibration(metrics)}
<h2>Unknown images: the open-set score of the validation images</h2>
{_open_set(metrics, predictions)}
<h2>Top losses: validation images the model gets wrong, then those it is least sure of</h2>
{_top_losses(predictions, why)}
<h2>Likely wrong labels: given &rarr; suggested</h2>{_label_issues(run_dir, metrics)}"""
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
{headline}
<h2>Run card</h2>{_run_card(metrics)}
<h2>Training curves</h2>{curves_html}
{details}
</body></html>
"""
    target = run_dir / REPORT_FILE
    write_text(target, page)
    return target

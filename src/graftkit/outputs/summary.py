"""The few lines ``graft fit`` and ``graft demo`` end with: what each phase gave, and where it is."""

from __future__ import annotations

import shlex
from pathlib import Path

from graftkit.frozen.runtimes import engine_label
from graftkit.outputs.compare import line as compared


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def print_summary(m: dict, run_dir) -> None:
    print("\nsummary")
    multi = m.get("multi_label")
    score = "mAP" if multi else "accuracy"
    frozen = m.get("frozen_outputs")
    if frozen and "seconds" in frozen:  # the one pass of the frozen base, not head training
        print(f"  {'frozen pass':<20} {frozen['computed']:,} outputs computed, "
              f"{frozen['from_cache']:,} from the cache  {frozen['seconds']:7.1f} s  "
              f"[{engine_label(frozen['engine'], frozen.get('precision', 'f32'))}]")
    for p in m["phases"]:
        label = "phase 1 (head)" if p["name"] == "head" else "phase 2 (fine-tune)"
        print(f"  {label:<20} {p['epochs']:>3} epochs  {p['seconds']:7.1f} s  "
              f"best val {score} {p['best_val_accuracy']:.4f}"
              + (f"  [{p['note']}]" if p["note"] else ""))
    if m.get("mode"):
        print(f"  mode {m['mode']['requested']:<15} chose {m['mode']['chosen'].replace('_', '-')}: "
              f"{m['mode']['reason']}")
    test = m.get("test")
    if multi:
        _label_set_lines(m, multi, test)
    elif test:
        print(f"  test accuracy        {test['accuracy']:.4f} on {test['num_images']} held-out "
              f"images; balanced accuracy {test['balanced_accuracy']:.4f} (scored once, nothing "
              "chosen on them)")
    if not multi:
        print(f"  final val accuracy   {m['val_accuracy']:.4f} on {m['num_val']} images "
              f"({m['total_seconds']:.1f} s in all); balanced accuracy "
              f"{m['balanced_accuracy']:.4f}")
    if "val_used_for" in m:
        print("  note                 the validation images chose " + m["val_used_for"]
              + f": their {'scores are' if multi else 'accuracy is'} optimistic"
              + ("" if test else "; a test/ folder beside train/ (or --test) gives a figure "
                                 "nothing was chosen on"))
    if not multi:
        recalls = ", ".join(f"{c} {v['recall']:.3f}" for c, v in m["per_class"].items())
        print(f"  recall per class     {recalls}")
    if m.get("class_weight"):
        print("  class weights        " + ", ".join(f"{c} {w:.2f}" for c, w in m["class_weight"].items()))
    findings = m.get("check", {}).get("findings")
    if findings:
        print(f"  data check           {_plural(len(findings), 'finding')}: "
              + "; ".join(f["message"] for f in findings[:3])
              + (f"; +{len(findings) - 3} more" if len(findings) > 3 else "")
              + f" (graft check {shlex.quote(m.get('data', 'DATA_DIR'))})")
    issues = m.get("label_issues")
    if issues:
        data = shlex.quote(m.get("data", "DATA_DIR"))
        print(f"  label issues         {issues['count']} of {issues['checked']} labels "
              f"{'looks' if issues['count'] == 1 else 'look'} wrong"
              + (f": {issues['file']}, ranked; graft serve {shlex.quote(str(run_dir))} --data "
                 f"{data} to review them" if issues["count"] else ""))
    if m.get("previous_run"):
        print(f"  {'against the last run':<20} {compared(m['previous_run'])}")
    if m["skipped_files"]:
        print(f"  skipped files        {len(m['skipped_files'])} (listed in metrics.json)")
    print(f"  outputs              {run_dir}/ (model.keras, report.html, labels.json, "
          "metrics.json, history.csv, predictions.csv, "
          + ("test_predictions.csv, " if test else "")
          + ("label_issues.csv, " if issues else "")
          + "split.json, curves.png, " + ("pr_curves.png" if multi else "confusion_matrix.png")
          + (", closest.npz, explain/" if (Path(run_dir) / "explain").is_dir() else "") + ")")


def _label_set_lines(m: dict, s: dict, test: dict | None) -> None:
    if test:
        print(f"  test mAP             {test['map']:.4f} on {test['num_images']} held-out "
              f"images; example-based F1 {test['example_f1']:.4f} (scored once, nothing chosen "
              "on them)")
    print(f"  final val mAP        {s['map']:.4f} on {m['num_val']} images "
          f"({m['total_seconds']:.1f} s in all); example-based F1 {s['example_f1']:.4f}, "
          f"micro F1 {s['micro_f1']:.4f}, macro F1 {s['macro_f1']:.4f}")
    ts = [r["threshold"] for r in s["per_label"]]
    print("  thresholds           "
          + ("one per label" if s["thresholds"] == "auto" else "one for all")
          + f", {min(ts):.2f}-{max(ts):.2f} (metrics.json multi_label.per_label)")

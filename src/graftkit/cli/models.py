"""``graft inspect``, ``graft backbones`` and ``graft cache``: models and what is cached for them."""

from __future__ import annotations

import argparse
import json
import time

from graftkit import defaults
from graftkit.cli.common import Command, add_unsafe, table


def preflight_inspect(args) -> None:
    from graftkit.cli.inspect import check_target

    check_target(args.target)


def cmd_inspect(args) -> int:
    from graftkit.cli.inspect import inspect_target

    title, rows, totals = inspect_target(args.target, flatten=args.all, unsafe=args.unsafe)
    if args.format == "json":
        print(json.dumps({"model": title, "layers": rows, "totals": totals}, indent=2))
        return 0
    print(title)
    cells = [[r["layer"], r["type"], r["weights"], r["trainable_weights"],
              r["non_trainable_weights"], f"{r['params']:,}", f"{r['trainable_params']:,}"]
             for r in rows]
    print(table(cells, ["layer", "type", "weights", "trainable", "non_trainable",
                        "params", "trainable_params"]))
    print(f"\ntotal: {totals['weights']} weights ({totals['trainable_weights']} trainable, "
          f"{totals['non_trainable_weights']} non-trainable); {totals['params']:,} parameters "
          f"({totals['trainable_params']:,} trainable)")
    if "trained" in totals:
        print(totals["trained"])
    return 0


def cmd_backbones(args) -> int:
    from graftkit.cli.inspect import backbone_rows

    rows = backbone_rows()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(table([[r["name"], r["input_size"], r["fit_size"], f"{r['imagenet_top1']:.1f}",
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
        print(table(rows, ["kind", "set", "files", "size", "last used"]))
    print(f"{cache_dir()}: {total / 1e6:.1f} MB of frozen outputs and engines in "
          f"{len(entries)} files; limit {store.cache_limit_bytes() / 1e9:.1f} GB "
          f"(${defaults.CACHE_LIMIT_ENV}), least recently used removed first")
    return 0


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="run folder, .keras file or backbone name")
    p.add_argument("--all", action="store_true", help="every layer inside nested models")
    add_unsafe(p)
    p.add_argument("--format", choices=("table", "json"), default="table")


def _backbones_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("info", "clear"))


COMMANDS = (
    Command(
        "inspect", "weights / trainable_weights / non_trainable_weights per layer",
        run=cmd_inspect, arguments=_inspect_arguments,
        preflight=preflight_inspect, tensorflow=True,
        examples="""
graft inspect runs/photos
graft inspect efficientnet_lite0 --all
graft inspect some/model.keras --format json
""",
    ),
    Command(
        "backbones", "list the backbones graftkit can build",
        run=cmd_backbones, arguments=_backbones_arguments,
        examples="""
graft backbones
graft backbones --format json
""",
    ),
    Command(
        "cache", "show or clear the cache of frozen-base outputs (what makes a rerun fast)",
        run=cmd_cache, arguments=_cache_arguments,
        examples="""
graft cache info
graft cache clear
""",
    ),
)

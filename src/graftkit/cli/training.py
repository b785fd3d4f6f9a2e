"""``graft fit``, ``graft refit``, ``graft lr-find`` and ``graft demo``: the commands that train."""

from __future__ import annotations

import argparse
from pathlib import Path

from graftkit.cli.common import Command, add_unsafe, verbose
from graftkit.errors import UsageError
from graftkit.outputs.summary import print_summary


def _training_kwargs(args) -> dict:
    from graftkit.options import from_arguments

    return {**from_arguments(args), "unsafe": args.unsafe, "verbose": verbose()}


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
    if not result.record.finished:  # a worker of a cluster other than the chief
        return 0
    print_summary(result.metrics, result.run_dir)
    return 0


def _refit_plan(args) -> tuple[str, Path, dict]:
    """``graft refit``'s data, run folder and options: the earlier run's, unless given."""
    from graftkit.options import FIT_OPTIONS
    from graftkit.outputs.run import next_run_dir, read_run

    record = read_run(args.run_dir)[2]
    data = args.data or record.data
    if not data:
        raise UsageError(f"{args.run_dir} records no data folder: pass --data DATA")
    out = Path(args.out) if args.out else next_run_dir(Path(args.run_dir))
    names = {o.name for o in FIT_OPTIONS}
    options = {k: v for k, v in record.options.items() if k in names}
    return data, out, options


def preflight_refit(args) -> None:
    from graftkit.train.workflow import check_inputs, make_options

    data, out, options = _refit_plan(args)
    check_inputs(data, out, make_options(**options), args.overwrite)


def cmd_refit(args) -> int:
    from graftkit.train.workflow import fit

    data, out, options = _refit_plan(args)
    print(f"refit of {args.run_dir}: {data} -> {out}, with its options", flush=True)
    result = fit(data, out, overwrite=args.overwrite, unsafe=args.unsafe, verbose=verbose(),
                 previous=args.run_dir, **options)
    if not result.record.finished:
        return 0
    print_summary(result.metrics, result.run_dir)
    return 0


def cmd_lr_find(args) -> int:
    from graftkit.train.lr_range import why
    from graftkit.train.workflow import lr_find

    phase = args.phase.replace("-", "_")
    tests = lr_find(args.data_dir, args.out, phase, overwrite=True, **_training_kwargs(args))
    test = tests[phase]
    print(f"\nsuggested {'--lr' if phase == 'head' else '--fine-tune-lr'} {test['suggestion']:.3g}"
          f"  ({why(test)}; {test['steps']} steps; plot {Path(args.out) / test['plot']})")
    return 0


def _training_options(p, out_help: str = "run folder to write") -> None:
    """The options of fit that decide the data, the model and the phases (lr-find takes them),
    from their one declaration (``graftkit.options.FIT_OPTIONS``), in argument groups."""
    from graftkit.options import add_arguments

    p.add_argument("data_dir", help="one subfolder per class, train/ and val/ of them, or a "
                                    "CSV/TSV of path,label rows")
    p.add_argument("--out", required=True, help=out_help)
    add_arguments(p)


def preflight_demo(args) -> None:
    from graftkit.outputs.run import check_run_dir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: pass a folder for the demo's data and run")
    check_run_dir(out / "run", args.overwrite)


def cmd_demo(args) -> int:
    from graftkit.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, verbose=verbose())
    return 0


def _fit_arguments(p: argparse.ArgumentParser) -> None:
    _training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_unsafe(p)
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard logs of both phases in OUT/tensorboard/")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (the same command does it too)")


def _refit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run to train again, with its options")
    p.add_argument("--data", help="the data folder (default: the run's own, as it is now)")
    p.add_argument("--out", help="the new run folder (default: RUN-2, or the next free number)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_unsafe(p)


def _lr_find_arguments(p: argparse.ArgumentParser) -> None:
    _training_options(p, "folder for the plots (lr_find_head.png, lr_find_fine_tune.png)")
    p.add_argument("--phase", choices=("head", "fine-tune"), default="head",
                   help="head: phase 1 on cached features; fine-tune: phase 1, then the test "
                        "for phase 2 on cached activations (--unfreeze N)")
    add_unsafe(p)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-run", help="folder for the data and the run")
    p.add_argument("--overwrite", action="store_true")


COMMANDS = (
    Command(
        "fit", "train a classifier on an image folder (two phases)",
        run=cmd_fit, arguments=_fit_arguments,
        preflight=preflight_fit, tensorflow=True,
        examples="""
graft fit photos/ --out runs/photos
graft fit photos/ --out runs/fast --fine-tune-epochs 0 --no-augment
graft fit photos/ --out runs/top --unfreeze 3 --fine-tune-lr 1e-4
graft fit photos/ --out runs/chain --base runs/earlier/model.keras
graft fit labels.csv --out runs/csv --val val_labels.csv   # rows: path,label
""",
    ),
    Command(
        "refit", "train a run again on its data as it is now (after the review or the inbox)",
        run=cmd_refit, arguments=_refit_arguments,
        preflight=preflight_refit, tensorflow=True,
        examples="""
graft refit runs/photos                    # runs/photos-2: same options, photos/ as it is now
graft refit runs/photos --out runs/clean   # the log says how many images are new or relabelled,
                                           # the summary how it does against runs/photos
""",
    ),
    Command(
        "lr-find", "learning-rate range test: a plot and a suggested rate for a phase",
        run=cmd_lr_find, arguments=_lr_find_arguments,
        preflight=preflight_fit, tensorflow=True,
        examples="""
graft lr-find photos/ --out runs/lr                       # phase 1 (head), seconds
graft lr-find photos/ --out runs/lr --phase fine-tune     # phase 2 on cached activations
graft fit photos/ --out runs/photos --lr auto --fine-tune-lr auto   # the same, inside fit
""",
    ),
    Command(
        "demo", "fine-tune EfficientNet-Lite0 on scikit-learn's digits, offline",
        run=cmd_demo, arguments=_demo_arguments,
        preflight=preflight_demo, tensorflow=True,
        examples="""
graft demo
graft demo --out /tmp/demo --overwrite
""",
    ),
)

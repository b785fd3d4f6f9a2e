"""Each training option is declared once: the CLI, fit() and the CLI reference agree with it."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

from graftkit.cli import build_parser
from graftkit.errors import UsageError
from graftkit.options import FIT_OPTIONS
from graftkit.train.workflow import FitOptions, fit, make_options

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location("cli_reference",
                                                  ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subparser(name: str):
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subs.choices[name]


@pytest.mark.parametrize("command", ["fit", "lr-find"])
def test_the_cli_has_every_option_with_its_declared_default(command):
    actions = {a.dest: a for a in _subparser(command)._actions}
    for option in FIT_OPTIONS:
        assert option.name in actions, option.name
        assert actions[option.name].default == option.default, option.name
        assert option.flag in actions[option.name].option_strings


def test_fit_takes_every_option_as_a_keyword_with_the_same_default():
    params = inspect.signature(fit).parameters
    for option in FIT_OPTIONS:
        assert params[option.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[option.name].default == option.default, option.name
        assert f"{option.name}: " in fit.__doc__


def test_fit_options_fields_are_the_declarations():
    assert [f.name for f in __import__("dataclasses").fields(FitOptions)] == \
        [o.name for o in FIT_OPTIONS]
    opts = make_options()
    assert opts.head_epochs == next(o.default for o in FIT_OPTIONS if o.name == "head_epochs")
    with pytest.raises(TypeError):
        FitOptions(1, 2)  # keyword-only: no positional mix-ups


def test_the_committed_cli_reference_is_current():
    ref = _reference()
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    made_with = re.search(r"under Python (\d+\.\d+)", page).group(1)
    if made_with != ref.PYTHON:
        pytest.skip(f"docs/cli.md was made under Python {made_with}; argparse lays help out "
                    f"differently under {ref.PYTHON}")
    assert page == ref.render(), "docs/cli.md is stale: run python scripts/cli_reference.py"
    for option in FIT_OPTIONS:
        assert option.flag in page


def test_a_stale_reference_is_detected(tmp_path, monkeypatch):
    ref = _reference()
    monkeypatch.setattr(ref, "PAGE", tmp_path / "cli.md")
    (tmp_path / "cli.md").write_text("old\n")
    monkeypatch.setattr(sys, "argv", ["cli_reference.py", "--check"])
    assert ref.main() == 1


# --- each option's values, checked from its declaration ---------------------------------------

def _edges(option):
    """``(values refused, values accepted)`` at the ends of the option's declared range."""
    from graftkit.options import Interval

    valid: Interval = option.valid
    low_in, high_in = valid.closed in ("both", "left"), valid.closed in ("both", "right")
    refused, accepted = [], []
    if valid.low is not None:
        refused.append(valid.low - 1)
        (accepted if low_in else refused).append(valid.low)
        if not low_in:
            accepted.append(valid.low + (0.5 if valid.high is not None else 1))
    if valid.high is not None:
        refused.append(valid.high + 1)
        (accepted if high_in else refused).append(valid.high)
    if option.type is int:
        accepted = [int(v) for v in accepted if float(v).is_integer()]
    return refused, accepted


RANGED = [o for o in FIT_OPTIONS if o.valid is not None]
CHOICES = [o for o in FIT_OPTIONS if o.choices is not None]


def test_the_derived_checks_cover_the_numeric_options():
    """Every numeric option states its range, so no check is left to a hand-written chain."""
    numeric = {o.name for o in FIT_OPTIONS if o.type in (int, float)} - {"seed"}
    assert numeric <= {o.name for o in RANGED}
    assert {"lr", "fine_tune_lr", "dropout", "label_smoothing"} <= {o.name for o in RANGED}


@pytest.mark.parametrize("option", RANGED, ids=lambda o: o.name)
def test_each_range_is_enforced_at_both_ends(option):
    refused, accepted = _edges(option)
    assert refused, option.name
    for value in refused:
        with pytest.raises(UsageError, match=f"^{re.escape(option.flag)} must be "):
            make_options(**{option.name: value})
    for value in accepted:
        assert getattr(make_options(**{option.name: value}), option.name) == value
    if option.auto:
        assert getattr(make_options(**{option.name: "auto"}), option.name) == "auto"


@pytest.mark.parametrize("option", CHOICES, ids=lambda o: o.name)
def test_each_choice_list_is_enforced(option):
    with pytest.raises(UsageError, match=f"^{re.escape(option.flag)} must be one of "):
        make_options(**{option.name: "nonsense"})
    for value in option.choices:
        make_options(**{option.name: value})


@pytest.mark.parametrize("option", RANGED, ids=lambda o: o.name)
def test_the_cli_refuses_an_out_of_range_value_in_one_line(option, tmp_path, capsys):
    """Before any TensorFlow work and before the data is looked at: exit 2, one line."""
    from graftkit.cli import main

    value = _edges(option)[0][0]
    code = main(["fit", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), option.flag,
                 str(int(value) if option.type is int else value)])
    err = capsys.readouterr().err
    assert code == 2 and f"{option.flag} must be" in err and err.count("\n") == 1, err


def test_a_non_number_is_refused_by_name():
    with pytest.raises(UsageError, match="--batch-size must be a number"):
        make_options(batch_size="eight")
    with pytest.raises(UsageError, match="--dropout must be a number or 'auto'"):
        make_options(dropout="lots")


@pytest.mark.parametrize("given, message", [
    ({"lr": "auto", "augment_head": True}, "--lr auto runs its range test on cached features"),
    ({"fine_tune_lr": "auto", "unfreeze": "all"}, "--fine-tune-lr auto runs its range test"),
    ({"fine_tune_lr": "auto", "unfreeze": 2, "fine_tune_epochs": 0}, "needs --unfreeze N"),
    ({"heads": 3, "augment_head": True}, "--heads averages heads"),
    ({"unfreeze_schedule": "3,1"}, "must be 0 or more and not decrease"),
])
def test_rules_between_options(given, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        make_options(**given)


def test_auto_head_schedule_gives_a_small_set_several_passes_an_epoch():
    """20 epochs of at least 30 steps (600 in all): a head on 100 images (4 steps a pass) was
    still learning after 20 passes; a number of epochs given means one pass each."""
    from graftkit.train.phases import head_schedule

    assert head_schedule("auto", 100, 32) == (20, 30) and head_schedule("auto", 1, 32) == (20, 30)
    assert head_schedule("auto", 1600, 32) == (20, 50)  # one pass is already more
    assert head_schedule("auto", 960, 32, whole_batches=True) == (20, 30)
    assert head_schedule(7, 100, 32) == (7, 4) and head_schedule(7, 100, 32, True) == (7, 3)
    assert make_options().head_epochs == "auto" and make_options(head_epochs="3").head_epochs == 3
    for bad in ("2.5", "many", 2.5, True):
        with pytest.raises(UsageError, match="--head-epochs must be a whole number or 'auto'"):
            make_options(head_epochs=bad)

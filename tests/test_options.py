"""Each training option is declared once: the CLI, fit() and the CLI reference agree with it."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

from graftkit.cli import build_parser
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

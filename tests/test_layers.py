"""The layer order of docs/design.md ("Layers"), enforced over every import in src/graftkit.

Imports inside functions and under TYPE_CHECKING count: a cycle hidden in a function body is
still a cycle for whoever reads or moves the code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "graftkit"


def layers() -> list[list[str]]:
    """The contract, top line first, as docs/design.md states it."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/design.md has no ```layers block"
    return [[name.strip() for name in line.split("|")]
            for line in block.group(1).splitlines() if line.strip()]


def unit_of(module: str, units: set[str]) -> str | None:
    """The contract's unit a module belongs to (its package, or itself)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in units:
            return ".".join(parts[:n])
    return None


def imports(path: Path) -> list[tuple[str, int]]:
    """``(module imported, line)`` for every graftkit import of a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("graftkit")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "graftkit":  # from graftkit import defaults: the submodules
                found += [(f"graftkit.{a.name}", node.lineno) for a in node.names]
            elif node.module.startswith("graftkit."):
                found.append((node.module, node.lineno))
    return found


def violations(contract: list[list[str]]) -> list[str]:
    level = {unit: i for i, line in enumerate(contract) for unit in line}
    units = set(level)
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "graftkit":
            continue  # the package's lazy public names: the API, above every layer
        mine = unit_of(module, units)
        if mine is None:
            problems.append(f"{module}: in no line of the layers block of docs/design.md")
            continue
        for target, line in imports(path):
            theirs = unit_of(target, units)
            if theirs is None:
                if target not in ("graftkit", "graftkit.__version__"):
                    problems.append(f"{module}:{line} imports {target}, in no layer")
                continue
            if theirs != mine and level[theirs] <= level[mine]:
                how = "a layer above" if level[theirs] < level[mine] else "its own line"
                problems.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {theirs} "
                                f"({how})")
    return problems


def test_every_import_follows_the_layer_order():
    assert violations(layers()) == []


def test_the_check_sees_imports_inside_functions():
    """The contract turned upside down must fail, and on imports inside function bodies too
    (train imports classifier only inside a function): a check that cannot fail checks nothing."""
    contract = layers()
    assert any("train/stages.py" in p for p in violations(contract[::-1]))
    flat = [[u for line in contract for u in line]]  # everything on one line: all independent
    assert any("graftkit.train imports graftkit.classifier" in p for p in violations(flat))

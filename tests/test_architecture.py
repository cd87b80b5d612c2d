"""The layer table of docs/architecture.md is the code's import graph: every chg_lens module is
listed, and none imports a higher layer (or a sibling where the table says no), at the top of a
module or inside a function."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "chg_lens"
DOC = REPO / "docs" / "architecture.md"


def table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def layer_table(text: str) -> tuple[dict[str, int], dict[int, bool], set[tuple[str, str]]]:
    """(module -> layer, layer -> same-layer imports allowed, allowed (importer, imported) exceptions)."""
    layer_of, same = {}, {}
    for cells in table_rows(text, "| layer | modules | same layer |"):
        layer = int(cells[0])
        same[layer] = cells[2] == "yes"
        for name in names(cells[1]):
            assert name not in layer_of, f"{name} is listed twice in {DOC.name}"
            layer_of[name] = layer
    exceptions = {(a, b, cells[2] == "in a function") for cells in table_rows(text, "| module | also imports |")
                  for a in names(cells[0]) for b in names(cells[1])}
    return layer_of, same, exceptions


def module_name(path: Path) -> str:
    """``chg_lens/tasks/ioi.py`` -> ``tasks.ioi``; ``chg_lens/__init__.py`` -> ``chg_lens``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "chg_lens"


def is_module(dotted: str) -> bool:
    base = PACKAGE.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _nodes(tree: ast.AST, in_function: bool = False):
    """Every node below ``tree`` with whether it sits inside a function."""
    for child in ast.iter_child_nodes(tree):
        yield child, in_function
        yield from _nodes(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imported(path: Path, *, where: bool = False) -> list[tuple]:
    """(line, chg_lens module) of every import of a chg_lens module in ``path`` (``chg_lens`` for a
    name of the package itself, e.g. ``from chg_lens import fit_chg``); with ``where``, (line,
    module, inside a function)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "chg_lens" else name.split(".")[:-1]
    if name == "chg_lens":
        package = []
    out = []
    for node, in_function in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "chg_lens" or alias.name.startswith("chg_lens."):
                    out.append((node.lineno, alias.name.removeprefix("chg_lens").lstrip(".") or "chg_lens", in_function))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "chg_lens" or (node.module or "").startswith("chg_lens."):
                target = node.module.removeprefix("chg_lens").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from chg_lens import checks` imports the module checks
                sub = f"{target}.{alias.name}" if target else alias.name
                out.append((node.lineno, sub if is_module(sub) else (target or "chg_lens"), in_function))
    return out if where else [(line, module) for line, module, _ in out]


def entry(module: str, layer_of: dict[str, int]) -> str | None:
    """The table entry that stands for ``module``: itself, or the package it belongs to."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in layer_of:
            return ".".join(parts[:n])
    return None


def violations(layer_of, same, exceptions) -> tuple[list[str], list[str]]:
    unlisted, bad = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = entry(module_name(path), layer_of)
        if me is None:
            unlisted.append(module_name(path))
            continue
        for line, target, in_function in imported(path, where=True):
            other = entry(target, layer_of)
            if other is None:
                unlisted.append(target)
            elif other != me and (me, other, False) not in exceptions and (me, other, in_function) not in exceptions and (
                    layer_of[other] > layer_of[me] or (layer_of[other] == layer_of[me] and not same[layer_of[me]])):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} (layer {layer_of[me]}) imports {other} "
                           f"(layer {layer_of[other]})")
    return sorted(set(unlisted)), bad


def test_every_module_is_listed_and_imports_only_lower_layers():
    layer_of, same, exceptions = layer_table(DOC.read_text(encoding="utf-8"))
    assert {"models", "results", "scoring", "chg", "cli", "chg_lens"} <= set(layer_of)
    assert layer_of["checks"] < layer_of["results"] < layer_of["fitting"] < layer_of["chg"] < layer_of["report"]
    unlisted, bad = violations(layer_of, same, exceptions)
    assert not unlisted, f"modules missing from the layer table of {DOC.name}: {unlisted}"
    assert not bad, "imports the layer table forbids:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import_an_unlisted_module_and_tolerates_planned_ones(tmp_path, monkeypatch):
    layer_of, same, exceptions = layer_table(DOC.read_text(encoding="utf-8"))
    assert not is_module("pairs") or "pairs" in layer_of  # listed modules may not exist yet
    fake = tmp_path / "chg_lens"
    (fake / "tasks").mkdir(parents=True)
    (fake / "__init__.py").write_text("from .chg import fit_chg\n")
    (fake / "checks.py").write_text("")
    (fake / "models.py").write_text("from . import checks\n")
    (fake / "chg.py").write_text("from .models import load\n")
    (fake / "tasks" / "__init__.py").write_text("from .ioi import ioi\n")
    (fake / "tasks" / "ioi.py").write_text("def ioi():\n    from chg_lens.chg import fit_chg\n")  # upward, in a function
    (fake / "ablation.py").write_text("from chg_lens import fit_chg\nfrom . import chg\n")  # the package, a sibling
    (fake / "mystery.py").write_text("")
    (fake / "compare.py").write_text("from . import plot\n\ndef f():\n    from . import plot\n")  # allowed in a function only
    (fake / "plot.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    unlisted, bad = violations(layer_of, same, exceptions)
    assert unlisted == ["mystery"]
    assert [b.split(": ", 1)[1] for b in bad] == [
        "ablation (layer 7) imports chg_lens (layer 10)", "ablation (layer 7) imports chg (layer 7)",
        "compare (layer 8) imports plot (layer 9)", "tasks (layer 3) imports chg (layer 7)"]
    assert [b.split(": ", 1)[0] for b in bad][2] == "chg_lens/compare.py:1"  # the top-level one, not line 4


@pytest.mark.parametrize("module", ["checks", "deprecation", "diagnostics", "stats", "taxonomy", "display"])
def test_leaves_import_no_chg_lens_module(module):
    assert imported(PACKAGE / f"{module}.py") == []

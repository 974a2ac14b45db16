"""Imports point one way: the graph of minirt's modules, with every import counted (module level and deferred
inside functions), has no circle, and generate reaches no particular mode."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import minirt

ROOT = Path(minirt.__file__).parent
MODES = {"minirt.modes.lowrank", "minirt.modes.pinv", "minirt.modes.speculative", "minirt.modes.jacobi",
         "minirt.modes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the minirt modules it imports anywhere in its text."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module
                # `from . import kernels` imports the submodule; `from .x import name`, the module x
                subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files}
                deps |= subs
                if len(subs) < len(node.names):
                    deps.add(target)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_the_walk_sees_the_imports():
    """The checker finds what the files say (a walk that saw nothing would pass every test below)."""
    g = import_graph()
    assert {"minirt.model", "minirt.modes", "minirt.registry"} <= g["minirt"]
    assert "minirt.cpu.kernels" in g["minirt.model"]           # from .cpu import kernels
    assert "minirt.generate" in g["minirt.model"]              # deferred, inside Model.generate
    assert "minirt.readers.base" in g["minirt.modes.lowrank"]  # from ..readers.base import Tensor
    assert "minirt.modes.lowrank" in g["minirt.modes"]         # from .lowrank import …, inside a function


def test_no_import_circle():
    g = import_graph()
    try:
        order = list(TopologicalSorter(g).static_order())
    except CycleError as e:
        pytest.fail(f"import circle: {' → '.join(reversed(e.args[1]))}")
    assert set(order) == set(g)


def test_a_circle_would_be_found():
    g = import_graph()
    g["minirt.generate"] = g["minirt.generate"] | {"minirt.modes.jacobi"}          # the circle the issue named,
    g["minirt.modes.jacobi"] = g["minirt.modes.jacobi"] | {"minirt.modes.pinv"}    # were it back
    with pytest.raises(CycleError):
        list(TopologicalSorter(g).static_order())


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in g[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def test_generate_imports_no_mode():
    g = import_graph()
    assert not reachable(g, "minirt.generate") & MODES
    assert not reachable(g, "minirt.sampling") & MODES

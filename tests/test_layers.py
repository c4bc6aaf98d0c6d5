"""The package's layers point one way: commands -> evaluation/planning -> runtime -> types and
model file -> native loader. Every import in every module (function-local ones included) is
read from the installed sources; an import of a higher layer, an import of pyadaq.cli from a
library module, or a circle of imports fails the test and names the modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pyadaq

PKG = Path(pyadaq.__file__).resolve().parent

# lower number: lower layer. A module may import its own layer or lower ones.
RANKS = {
    "pyadaq._version": 0,
    "pyadaq._atomic": 0,
    "pyadaq._paths": 0,
    "pyadaq._native": 1,
    "pyadaq.types": 2,
    "pyadaq.quants_ref": 2,
    "pyadaq.model": 2,
    "pyadaq.report": 2,
    "pyadaq.runtime": 3,
    "pyadaq.tools": 3,
    "pyadaq.eval": 4,
    "pyadaq.plan": 5,
    "pyadaq.llama": 6,
    "pyadaq.cli": 7,
    "pyadaq.__main__": 8,
    "pyadaq": 8,  # the package's __init__: the public names
}


def rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def module_name(path: Path) -> str:
    parts = ["pyadaq", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """The pyadaq modules a source file imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pyadaq"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pyadaq":
                continue
            for a in node.names:  # `from pyadaq.x import y` may name the submodule pyadaq.x.y
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    out.discard(mod)
    return out


def _exists(module: str) -> bool:
    p = PKG.joinpath(*module.split(".")[1:])
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    for mod in graph():
        assert rank(mod) is not None, mod


def test_no_upward_import():
    bad = []
    for mod, deps in graph().items():
        for dep in sorted(deps):
            if rank(dep) > rank(mod):
                bad.append(f"{mod} (layer {rank(mod)}) imports {dep} (layer {rank(dep)})")
            elif dep.startswith("pyadaq.cli") and not mod.startswith("pyadaq.cli") and mod != "pyadaq.__main__":
                bad.append(f"library module {mod} imports the command line's {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    g = graph()
    state: dict = {}
    stack: list = []
    circles = []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == "open":
                circles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_the_checks_see_a_planted_upward_import(tmp_path, monkeypatch):
    """The walker reads function-local imports: a runtime module importing the planner inside a
    function is reported."""
    fake = tmp_path / "pyadaq"
    (fake / "runtime").mkdir(parents=True)
    (fake / "plan").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "runtime" / "__init__.py").write_text("")
    (fake / "plan" / "__init__.py").write_text("")
    (fake / "plan" / "planner.py").write_text("from pyadaq.runtime import thing\n")
    (fake / "runtime" / "thing.py").write_text("def f():\n    from ..plan import planner\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert graph()["pyadaq.runtime.thing"] == {"pyadaq.plan.planner"}
    with pytest.raises(AssertionError, match=r"pyadaq.runtime.thing \(layer 3\) imports pyadaq.plan.planner"):
        test_no_upward_import()
    circle = r"pyadaq\.plan\.planner -> pyadaq\.runtime\.thing -> pyadaq\.plan\.planner"
    with pytest.raises(AssertionError, match=circle):
        test_no_import_circle()

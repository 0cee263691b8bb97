"""The package's architecture, checked: every import goes from a higher role to a lower one, no cycles.

Roles, top to bottom: cli -> experiments / bench -> train / fit / eval -> convert / index -> store / data
-> engine -> _util. Modules of one role may import each other and modules of other roles on the same
floor, but never in a cycle; lazy imports inside functions count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bc_fast

PACKAGE = Path(bc_fast.__file__).resolve().parent  # the source folder, or the installed copy the wheel job tests

#: Role (the first package below bc_fast, or the top-level module) -> floor; higher floors import lower ones.
FLOORS = {
    "_util": 0, "_core": 0, "_cuda": 0,
    "engine": 1,
    "store": 2, "data": 2, "export": 2,
    "convert": 3, "index": 3,
    "train": 4, "fit": 4, "eval": 4,
    "experiments": 5, "bench": 5,
    "cli": 6,
}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """bc_fast modules that ``name`` imports, anywhere in the file (``from . import x`` resolves to the module x)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t.startswith("bc_fast") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {"bc_fast._core", "bc_fast._cuda"}
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_known_role():
    unknown = sorted(m for m in _modules() if m != "bc_fast" and _role(m) not in FLOORS)
    assert not unknown, f"modules outside the known roles (add the role to FLOORS and the README's Layout): {unknown}"


def test_imports_only_go_downward():
    upward = []
    for importer, targets in _graph().items():
        if importer == "bc_fast":
            continue  # the facade re-exports the engine and installs the moved-module aliases
        for t in targets:
            if t == "bc_fast":
                continue  # __version__ from the facade
            if FLOORS[_role(t)] > FLOORS[_role(importer)]:
                upward.append(f"{importer} -> {t}")
    assert not upward, "imports that go up a floor:\n" + "\n".join(sorted(upward))


def test_the_facade_imports_only_the_engine_and_helpers():
    assert {_role(t) for t in _graph()["bc_fast"]} <= {"engine", "_util"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of code
    cleaned = {m: {t for t in ts if not (m.startswith(t + ".") or t == "bc_fast")} for m, ts in graph.items()}
    assert _cycles(cleaned) == []


def test_no_import_cycle_between_roles():
    roles: dict[str, set[str]] = {}
    for importer, targets in _graph().items():
        if importer == "bc_fast":
            continue
        roles.setdefault(_role(importer), set()).update(
            _role(t) for t in targets if t != "bc_fast" and _role(t) != _role(importer))
    assert _cycles(roles) == []


def test_the_cycle_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small_or_says_why(name):
    path = _modules()[name]
    lines = path.read_text().count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "one module" in doc.lower(), (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines (> {MAX_LINES}): split it by what it does, or say at "
        "its top why it stays one module")


def test_every_package_says_what_lives_there():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 15, f"{init.relative_to(PACKAGE.parent)} needs a docstring: what lives here"

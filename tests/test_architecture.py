"""Imports run one way (shared/DESIGN.md, "Layout and layers"): a module never imports one of a
higher layer, not even lazily inside a function. Read from the source with ``ast``; nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distill"

# Layers, bottom first. A module may import its own layer or any lower one. Modules not listed
# (none should be) make the test fail, so a new module has to be placed deliberately.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["distill.batch", "distill.papers", "distill.files", "distill.locks", "distill.progress"]),
    ("models, data, integrations", ["distill.models", "distill.data", "distill.integrations"]),
    ("functional", ["distill.functional"]),
    ("taps, adapters, teacher sources", ["distill.taps", "distill.adapters", "distill.teachers", "distill.cache",
                                          "distill.token_cache", "distill.generations"]),
    ("methods", ["distill.methods"]),
    ("distiller", ["distill.distiller"]),
    ("train", ["distill.train"]),
    ("strategies, synthesis", ["distill.strategies", "distill.synthesis"]),
    ("recipes", ["distill.recipes", "distill.report"]),
    ("runner", ["distill.runner", "distill.lm_runner", "distill.graph_runner",
                "distill.generative_runner", "distill.recipe_runs", "distill.demo", "distill.auto"]),
    ("commands", ["distill.cli", "distill.__main__", "distill"]),
]


def _module_name(path: Path, root: Path | None = None) -> str:
    rel = path.relative_to((root or PACKAGE).parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching prefix, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def _imports(path: Path, root: Path | None = None) -> list[tuple[int, str]]:
    """Every ``distill`` module ``path`` imports (top-level or lazily), with its line."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found += [(node.lineno, f"{stem}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "distill" or name.startswith("distill.")]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [_module_name(p) for p in _sources() if _layer(_module_name(p)) is None]
    assert not unplaced, f"place these modules in LAYERS (and in shared/DESIGN.md's picture): {unplaced}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: _module_name(p))
def test_imports_run_downwards(path: Path):
    module = _module_name(path)
    own = _layer(module)
    if own is None:
        pytest.fail(f"{module} has no layer")
    upward = []
    for line, name in _imports(path):
        if name == "distill" and module.startswith("distill."):
            upward.append(f"line {line}: imports the package root 'distill' (the top layer)")
            continue
        target = _layer(name)
        # ``from distill.x import name``: ``distill.x.name`` may be an attribute, not a module
        while target is None and "." in name:
            name = name.rsplit(".", 1)[0]
            target = _layer(name)
        if target is not None and target > own:
            upward.append(f"line {line}: {name} ({LAYERS[target][0]}) from a module of layer '{LAYERS[own][0]}'")
    assert not upward, f"{module} imports upwards:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The test itself must be able to fail: a lazy import of the runner from a teacher source."""
    fake = PACKAGE / "teachers.py"
    source = fake.read_text(encoding="utf-8") + "\n\ndef _late():\n    from distill.runner import run_recipe\n"
    planted = tmp_path / "distill" / "teachers.py"
    planted.parent.mkdir()
    planted.write_text(source, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "distill")
    with pytest.raises(AssertionError, match="distill.runner"):
        test_imports_run_downwards(planted)


def _graph(root: Path) -> dict[str, set[str]]:
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, name in _imports(path, root):
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            # a submodule importing its own package's __init__ is how Python loads it, not a cycle
            if name in modules and name != module and not module.startswith(name + "."):
                edges[module].add(name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_graph(PACKAGE)) == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    pkg = tmp_path / "distill"
    (pkg / "strategies").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "strategies" / "__init__.py").write_text("")
    (pkg / "strategies" / "a.py").write_text("def f():\n    from distill.strategies.b import g\n")
    (pkg / "strategies" / "b.py").write_text("from distill.strategies.a import f\n")
    assert _cycles(_graph(pkg)) == [["distill.strategies.a", "distill.strategies.b"]]

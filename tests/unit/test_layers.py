"""The import layers of lmlab (``lmlab.LAYERS``, drawn in ``lmlab/__init__.py``): no module imports from a
layer above its own, at module level or inside a function, and no two modules of lmlab import each other
through any chain (a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmlab

PACKAGE = Path(lmlab.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("lmlab", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The lmlab modules ``path`` imports, wherever the import statement stands (relative imports resolved)."""
    own = ".".join(("lmlab", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("lmlab") and name != "lmlab":
                targets.add(name)
    return targets


def _layer(module: str) -> int:
    top = module.split(".")[1]
    for level, names in enumerate(lmlab.LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer of lmlab.LAYERS: add {top!r} to one")


def test_every_module_is_in_a_layer():
    for module in _modules():
        if module != "lmlab":
            _layer(module)


def test_no_module_imports_from_a_layer_above_its_own():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        if module == "lmlab":
            continue
        for target in _imports(path, modules):
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_modules_import_each_other_in_a_cycle():
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is the package handing them on, not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(nxt_ := node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[nxt_] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []

"""The layer order of the packages (README: Layout): a module imports only from its own package or from lower layers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# lowest first; packages on one floor must not import each other either
LAYERS: list[tuple[str, ...]] = [
    ("utils.core",),
    ("models",),
    ("utils.data", "utils.reporting"),
    ("utils.evaluation",),
    ("utils.training",),
    ("optimizer",),
]
FLOOR = {pkg: i for i, floor in enumerate(LAYERS) for pkg in floor}
ENTRY_POINTS = {"train", "val"}


def _package(module: str) -> str | None:
    """The layered package a dotted module name belongs to (None: not ours)."""
    for pkg in sorted(FLOOR, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    if module in ENTRY_POINTS or module == "utils":
        return module
    return None


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from utils import plots`
    return out


def _edges() -> list[tuple[str, str, str]]:
    """(file, its package, imported package) for every import between two of our packages."""
    edges = []
    for folder in ("utils", "models", "optimizer"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            mod = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            me = _package(mod)
            for target in _imports(f):
                them = _package(target)
                if them is not None and them != me and not (me and them == "utils"):
                    edges.append((str(f.relative_to(ROOT)), me, them))
    return edges


def upward(edges: list[tuple[str, str, str]]) -> list[str]:
    """The imports that run to a higher floor, to the same floor's other package, or to an entry point."""
    bad = []
    for f, me, them in edges:
        if them in ENTRY_POINTS or me not in FLOOR or them not in FLOOR or FLOOR[them] >= FLOOR[me]:
            bad.append(f"{f} ({me}) imports {them}")
    return sorted(set(bad))


def test_every_package_is_on_a_floor():
    pkgs = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "utils").glob("*/__init__.py")}
    assert pkgs <= set(FLOOR), pkgs - set(FLOOR)
    assert not [f for f in (ROOT / "utils").glob("*.py") if f.name != "__init__.py"]  # no loose modules


def test_no_import_runs_up_a_layer():
    edges = _edges()
    assert edges, "no import between packages found: the scan is broken"
    assert upward(edges) == []


def test_no_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for _, me, them in _edges():
        graph.setdefault(me, set()).add(them)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    assert [p for p in graph if reaches(p, p, set())] == []


@pytest.mark.parametrize("edge, bad", [
    (("utils/training/evolve.py", "utils.training", "optimizer"), True),
    (("utils/evaluation/metrics.py", "utils.evaluation", "utils.reporting"), False),
    (("utils/data/datasets.py", "utils.data", "utils.reporting"), True),  # same floor, other package
    (("models/yolo.py", "models", "utils.core"), False),
    (("optimizer/loss.py", "optimizer", "train"), True),
])
def test_the_check_catches_an_upward_import(edge, bad):
    assert bool(upward([edge])) is bad

"""The layer order of the packages (README: Layout): a module imports only from its own package or from lower layers,
and no files import each other in a circle, inside a package or across."""
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


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (lazy imports too), for every file under utils/, models/ and
    optimizer/; an imported name that is no file of ours (a class, a constant) adds nothing."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts): f
             for folder in ("utils", "models", "optimizer") for f in sorted((ROOT / folder).rglob("*.py"))}
    modules = {m.removesuffix(".__init__"): m for m in files}
    return {m: {modules[t] for t in _imports(f) if t in modules and modules[t] != m} for m, f in files.items()}


def circles(graph: dict[str, set[str]]) -> list[str]:
    """One line per group of modules that import each other in a circle (a strongly connected component of more
    than one module, or a module that imports itself), e.g. 'a -> b -> a'."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                out.append(_one_circle(graph, set(group)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _one_circle(graph: dict[str, set[str]], group: set[str]) -> str:
    """A path from the group's first module back to it through the group: 'a -> b -> a'."""
    start = min(group)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the shortest circle through `start`
        v = todo.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                return " -> ".join(paths[v] + [start])
            if w in group and w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return start


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


def test_no_circle_between_files():
    graph = _module_graph()
    assert graph["optimizer.criterion"], "no import between files found: the scan is broken"
    assert circles(graph) == []


@pytest.mark.parametrize("graph, found", [
    ({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}, ["p.a -> p.b -> p.c -> p.a"]),
    ({"p.a": {"p.b", "p.c"}, "p.b": {"p.c"}, "p.c": set()}, []),
    ({"p.a": {"p.a"}}, ["p.a -> p.a"]),
    ({"p.a": {"p.b"}, "p.b": {"p.a"}, "q.x": {"q.y"}, "q.y": {"q.x"}}, ["p.a -> p.b -> p.a", "q.x -> q.y -> q.x"]),
])
def test_the_check_catches_a_circle(graph, found):
    assert circles(graph) == found


def test_a_lazy_import_counts(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def late():\n    from optimizer.config import check_kd_values\n")
    assert "optimizer.config" in _imports(f)


@pytest.mark.parametrize("edge, bad", [
    (("utils/training/evolve.py", "utils.training", "optimizer"), True),
    (("utils/evaluation/metrics.py", "utils.evaluation", "utils.reporting"), False),
    (("utils/data/datasets.py", "utils.data", "utils.reporting"), True),  # same floor, other package
    (("models/yolo.py", "models", "utils.core"), False),
    (("optimizer/loss.py", "optimizer", "train"), True),
])
def test_the_check_catches_an_upward_import(edge, bad):
    assert bool(upward([edge])) is bad

"""dicesim's modules import one another without cycles: the graph of imports (read with
ast; `if TYPE_CHECKING:` blocks left out, imports inside functions counted) over every module
of the package is acyclic."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGE = "dicesim"


def package_modules(root: Path = REPO / PACKAGE) -> dict[str, Path]:
    """Dotted name → file of every module in the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def module_level_imports(tree: ast.Module, in_functions: bool = False
                         ) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: at top level or nested in if/try/with/class
    bodies, but not in an `if TYPE_CHECKING:` branch; with `in_functions`, also the imports
    functions make when they run (a dependency all the same)."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if in_functions:
                pending.extend(node.body)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        elif isinstance(node, ast.stmt):
            pending.extend(child for child in ast.iter_child_nodes(node)
                           if isinstance(child, ast.stmt | ast.excepthandler))
        elif isinstance(node, ast.excepthandler):
            pending.extend(node.body)


def imported_modules(name: str, path: Path, modules: dict[str, Path],
                     in_functions: bool = False) -> set[str]:
    """The package's modules that importing `name` imports directly (with `in_functions`,
    also those its functions import)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in module_level_imports(ast.parse(path.read_text(), str(path)), in_functions):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: from the module's own package upwards
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from a import b` imports a, and a.b too where b is a module
            targets = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:  # the nearest enclosing module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)  # what the import names: a dependency, ancestor or not
            target = target.rpartition(".")[0]
            # importing a.b.c runs a and a.b too, but the importer's own ancestors have run
            # before it did (a package's modules importing one another are no cycle)
            while target.startswith(PACKAGE) and not name.startswith(target + "."):
                found.add(target)
                target = target.rpartition(".")[0]
    return found


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules, in_functions)
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module
    (Tarjan's algorithm, iterative), the shortest through the component's first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return [_shortest_cycle(graph, sorted(c)[0], c) for c in components]


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first from start until an edge leads back to it
        following = []
        for node in frontier:
            for child in sorted(graph[node] & within):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a cycle yet no path leads back to it")


# ---- the cycle finder itself ------------------------------------------------------------------
def test_the_cycle_finder_names_each_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"},
             "g": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_inside_functions_and_type_checking_are_not_module_level(tmp_path):
    source = ("from typing import TYPE_CHECKING\nimport dicesim.common.errors\n"
              "if TYPE_CHECKING:\n    import dicesim.run.engine\nelse:\n"
              "    import dicesim.model.data\n"
              "try:\n    from dicesim.comm import exchange\nexcept ImportError:\n"
              "    import dicesim.model.models\n"
              "from dicesim.influence.trackers import dice_e, Tracker\n"
              "def late():\n    import dicesim.report.summary\n"
              "class Holder:\n    import dicesim.graph.topology\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = imported_modules("dicesim.probe", path, package_modules())
    packages = {"dicesim.common", "dicesim.model", "dicesim.comm", "dicesim.influence",
                "dicesim.graph"}  # not dicesim itself: it ran before dicesim.probe
    assert found == packages | {
        "dicesim.common.errors", "dicesim.model.data", "dicesim.comm.exchange",
        "dicesim.model.models", "dicesim.influence.trackers",
        "dicesim.influence.trackers.dice_e", "dicesim.graph.topology"}
    with_functions = imported_modules("dicesim.probe", path, package_modules(), in_functions=True)
    assert with_functions == found | {"dicesim.report", "dicesim.report.summary"}


def test_a_package_module_depends_on_its_package_only_when_it_names_it(tmp_path):
    path = tmp_path / "report.py"
    path.write_text("from dicesim.experiments.alignment.analysis import worst\n")
    name = "dicesim.experiments.alignment.report"
    assert imported_modules(name, path, package_modules()) == {
        "dicesim.experiments.alignment.analysis"}
    path.write_text("from dicesim.experiments.alignment import worst\n")  # runs __init__
    assert imported_modules(name, path, package_modules()) == {"dicesim.experiments.alignment"}
    graph = {"p": {"p.a"}, "p.a": {"p"}}  # so a module that imports its own package's
    assert cycles(graph) == [["p", "p.a", "p"]]  # __init__, which imports it, is a cycle


# ---- the package --------------------------------------------------------------------------
def test_the_package_has_no_import_cycle():
    """Imports made inside functions count: deferring an import hides a cycle from the
    interpreter, not from a reader."""
    graph = import_graph(in_functions=True)
    assert {"dicesim.run.engine", "dicesim.report.summary",
            "dicesim.influence.attribution"} <= graph.keys()
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


# ---- the layering -----------------------------------------------------------------------
LAYERS = (  # lowest first: a module imports from its own layer and the layers below it only
    ("dicesim.common",),  # errors, signals and stops, atomic files, graph files
    ("dicesim.config",),  # the typed settings
    ("dicesim.graph", "dicesim.model"),  # topologies; models and data sets
    ("dicesim.comm",),  # ranks, routes, the exchange
    ("dicesim.optim",),  # local optimizers, schedules, aggregators, attacks
    ("dicesim.influence",),  # events, trackers, the reverse pass
    ("dicesim.run",),  # building a run, the step loop, checkpoints, run directories
    ("dicesim.report",),  # summary, report.md, figures
    ("dicesim.experiments", "dicesim.bench", "dicesim.testing"),
    ("dicesim.cli", "dicesim.launch", "dicesim.torchrun", "dicesim.__main__"),
)


def layer_of(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is in no layer of LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import of a module from a higher layer (a package's own ancestors
    and the root package, which run first whatever is imported, are not dependencies)."""
    found = []
    for name, targets in graph.items():
        if name == PACKAGE:
            continue
        for target in targets:
            if target == PACKAGE or name.startswith(target + "."):
                continue
            if layer_of(target) > layer_of(name):
                found.append(f"{name} -> {target}")
    return sorted(found)


def test_the_layer_check_finds_an_upward_import():
    graph = {"dicesim.common.errors": {"dicesim.run.engine"}, "dicesim.run.engine":
             {"dicesim.common.errors", "dicesim"}, "dicesim.run": set()}
    assert upward_imports(graph) == ["dicesim.common.errors -> dicesim.run.engine"]


def test_every_module_has_a_layer_and_imports_flow_downwards():
    graph = import_graph(in_functions=True)
    for name in graph:
        if name != PACKAGE:
            layer_of(name)
    assert not (found := upward_imports(graph)), "upward imports: " + "; ".join(found)


# ---- function length ------------------------------------------------------------------------
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {
    # the full-horizon reverse pass: another branch is reworking it (memory of the exchange);
    # split it there, then drop this entry
    "dicesim.influence.attribution.ReversePass.run",
}


def long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """module.Class.function → its length in lines (decorators left out), for every function
    or method longer than `limit`; nested functions count inside their parent and alone."""
    found = {}
    for name, path in modules.items():
        pending: list[tuple[str, ast.AST]] = [(name, ast.parse(path.read_text(), str(path)))]
        while pending:
            prefix, node = pending.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        length = child.end_lineno - child.lineno + 1
                        if length > limit:
                            found[qualified] = length
                    pending.append((qualified, child))
                elif isinstance(child, ast.stmt):
                    pending.append((prefix, child))
    return found


def test_the_length_check_finds_a_long_method(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    path = tmp_path / "probe.py"
    path.write_text(f"class A:\n    def short(self):\n        pass\n\n    def long(self):\n{body}\n"
                    f"\nif True:\n    def g():\n{body}\n        return 0\n")
    assert long_functions({"probe": path}) == {"probe.A.long": 81, "probe.g": 82}


def test_no_function_is_longer_than_80_lines_but_the_allowed():
    found = long_functions(package_modules())
    assert found.keys() <= LONG_FUNCTIONS_ALLOWED, (
        "split into named steps: " + ", ".join(f"{k} ({v} lines)" for k, v in sorted(
            found.items()) if k not in LONG_FUNCTIONS_ALLOWED))
    assert not (stale := LONG_FUNCTIONS_ALLOWED - found.keys()), (
        f"no longer long, take off the allow-list: {sorted(stale)}")

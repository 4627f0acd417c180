"""The import graph of pcidev and the NVMe plugin: no cycles, and the core below the tools.

Every intra-project import counts as an edge, wherever it sits: at module level,
inside a function (a function-local import only hides a cycle from the
interpreter) or under ``if TYPE_CHECKING:``, and so does ``importlib.import_module("literal.name")``
(or ``import_module(...)``) with a literal name. ``from pkg import name`` is an edge
to ``pkg.name`` when that is a module, else to ``pkg``; a package's
``__init__`` is a module like any other (its re-exports are its edges). Importing
``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` too, but those implicit edges
are not counted: a package may re-export its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: import name -> source directory
PACKAGES = {"pcidev": ROOT / "pcidev", "pcidev_nvme": ROOT / "plugins" / "nvme" / "src" / "pcidev_nvme",
            "pcidev_virtio": ROOT / "examples" / "plugins" / "pcidev-virtio" / "src" / "pcidev_virtio"}
#: compiled modules (no source here; built by pcidev/_native_build.py, possibly absent)
EXTENSION_MODULES = ("pcidev._native",)

#: Cycles tolerated, each a set of modules whose strongly connected component may
#: exist (or shrink). Both lists are empty and meant to stay so: cut a cycle, do
#: not list it.
PCIDEV_ALLOWED_CYCLES: dict[str, frozenset[str]] = {}

NVME_ALLOWED_CYCLES: dict[str, frozenset[str]] = {}

#: The device-model core: it must not depend on the tools built on top of it.
CORE = ("pcidev.pci", "pcidev.bar", "pcidev.irq", "pcidev.dma", "pcidev.native", "pcidev.device",
        "pcidev.vmstate", "pcidev.errors")
ABOVE_CORE = ("pcidev.transport", "pcidev.host", "pcidev.cli", "pcidev.plugins", "pcidev.registry",
              "pcidev.migration")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    found = {}
    for name, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _leaves() -> set[str]:
    return set(EXTENSION_MODULES)


def _resolve(target: str, modules: set[str]) -> str | None:
    """The longest known module that ``target`` names or lies in."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _imported_by_call(node: ast.AST) -> str | None:
    """The module of ``importlib.import_module("x")`` / ``import_module("x")`` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    first = node.args[0]
    if name == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def module_edges(module: str, source: str, known: set[str], *, is_pkg: bool = False) -> set[str]:
    """The known modules that the source of ``module`` imports, wherever the import sits.

    :param module: the importing module's dotted name.
    :param source: its source text.
    :param known: every module of the project.
    :param is_pkg: ``module`` is a package's ``__init__``.
    """
    edges = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        else:
            called = _imported_by_call(node)
            targets = [called] if called else []
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                edges.add(resolved)
    return edges


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (top-level, function-local, TYPE_CHECKING, import_module)."""
    modules = _modules()
    known = set(modules) | _leaves()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in modules.items():
        graph[module] = module_edges(module, path.read_text(), known, is_pkg=path.name == "__init__.py")
    return graph


def cycles(graph: dict[str, set[str]], nodes: set[str]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), within ``nodes``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & nodes):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(frozenset(scc))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def _unexpected(found: list[frozenset[str]], allowed: dict[str, frozenset[str]]) -> list[list[str]]:
    return [sorted(scc) for scc in found if not any(scc <= ok for ok in allowed.values())]


def test_the_graph_sees_the_project(graph):
    assert "pcidev.device" in graph and "pcidev_nvme.controller" in graph
    assert "pcidev.pci.config" in graph["pcidev.device"]


def test_no_import_cycle_in_pcidev(graph):
    nodes = {m for m in graph if _within(m, ("pcidev",))}
    assert _unexpected(cycles(graph, nodes), PCIDEV_ALLOWED_CYCLES) == []


def test_no_import_cycle_in_the_nvme_plugin_beyond_the_allow_list(graph):
    nodes = {m for m in graph if _within(m, ("pcidev_nvme",))}
    assert _unexpected(cycles(graph, nodes), NVME_ALLOWED_CYCLES) == []


@pytest.mark.parametrize("core", sorted(m for m in import_graph() if _within(m, CORE)))
def test_the_core_does_not_import_the_layers_above_it(graph, core):
    assert sorted(m for m in _reachable(graph, core) if _within(m, ABOVE_CORE)) == []


def test_no_import_cycle_in_the_virtio_plugin(graph):
    nodes = {m for m in graph if _within(m, ("pcidev_virtio",))}
    assert nodes and cycles(graph, nodes) == []


def test_pcidev_never_imports_the_nvme_plugin(graph):
    offenders = {m: sorted(t for t in targets if _within(t, ("pcidev_nvme", "pcidev_virtio")))
                 for m, targets in graph.items() if _within(m, ("pcidev",))}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_cycle_detection_and_the_allow_list_on_a_toy_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph, set(graph)) == [frozenset({"a", "b", "c"})]
    assert _unexpected(cycles(graph, set(graph)), {"x": frozenset({"a", "b", "c", "d"})}) == []
    assert _unexpected(cycles(graph, set(graph)), {"x": frozenset({"a", "b"})}) == [["a", "b", "c"]]


def test_import_module_calls_with_a_literal_name_are_edges():
    known = {"toy", "toy.a", "toy.b", "toy.c", "toy.d", "toy.e"}
    source = """
import importlib
from importlib import import_module

from toy import a

def later():
    importlib.import_module("toy.b")
    import_module("toy.c.inner")
    import_module(name_from_elsewhere)
    something.import_module("toy.d")
    importlib.reload("toy.e")
"""
    assert module_edges("toy.main", source, known) == {"toy.a", "toy.b", "toy.c", "toy.d"}


def test_the_cli_sees_the_demo(graph):
    assert "pcidev.demo" in graph["pcidev.cli.demo"]

"""The layering holds: no import cycles in src/, the core never imports a transport, and
``import keybus`` stays light. Read from the source (AST), so a violation fails here
before it ever shows up as an import-order bug."""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import keybus

SRC = Path(keybus.__file__).parent
# Layers above the core that may import anything (they wire or test it).
_OUTER = ("keybus.transports", "keybus.testing", "keybus.bench", "keybus.cli", "keybus.__main__")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    typing_only: bool  # inside `if TYPE_CHECKING:`
    lazy: bool  # inside a function: runs when called, not at import


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The keybus module an import names (``from keybus.x import y``: keybus.x.y if that
    is a module, else keybus.x)."""
    return target if target in modules else None


@functools.cache
def _edges() -> tuple[Edge, ...]:
    """Every import edge, read in a thread of its own: CPython 3.11's AST constructor
    can fail with "recursion depth mismatch" in a thread where a RecursionError was
    caught earlier (the envelope tests provoke some on purpose); a new thread starts with
    a clean count."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return tuple(pool.submit(_read_edges).result())


def _read_edges() -> list[Edge]:
    modules = _modules()
    edges: list[Edge] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, typing_only: bool, lazy: bool, name: str = name) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for stmt in child.body:
                        visit_stmt(stmt, True, lazy)
                    for stmt in child.orelse:
                        visit_stmt(stmt, typing_only, lazy)
                    continue
                visit_stmt(child, typing_only, lazy)

        def visit_stmt(
            node: ast.AST, typing_only: bool, lazy: bool, name: str = name, package: str = package
        ) -> None:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if not target.startswith("keybus"):
                    continue
                found = _resolve(target, modules)
                if found is not None and found != name:
                    edges.append(Edge(name, found, getattr(node, "lineno", 0), typing_only, lazy))
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(node, typing_only, inner)

        visit(tree, False, False)
    return edges


def _is_core(module: str) -> bool:
    return not module.startswith(_OUTER)


def test_no_import_cycles_in_src() -> None:
    graph: dict[str, set[str]] = {}
    for edge in _edges():
        if not edge.typing_only and not edge.lazy:
            graph.setdefault(edge.source, set()).add(edge.target)
    # A package imports its submodules' parents first: __init__ -> child is no cycle
    # unless the child imports back, which the search below finds like any other.
    state: dict[str, int] = {}
    stack: list[str] = []

    def search(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = search(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = search(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_a_transport() -> None:
    """Core modules import nothing from keybus.transports at run time; for types they may
    name the interface (keybus.transports.base) under TYPE_CHECKING, nothing else."""
    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in _edges()
        if _is_core(e.source)
        and e.target.startswith("keybus.transports")
        and not (e.typing_only and e.target == "keybus.transports.base")
    ]
    assert not bad, bad


def test_the_transport_interface_depends_on_the_core_only() -> None:
    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in _edges()
        if e.source == "keybus.transports.base" and not _is_core(e.target)
    ]
    assert not bad, bad


def test_transports_do_not_import_each_other() -> None:
    def backend(module: str) -> str | None:
        parts = module.split(".")
        if len(parts) >= 3 and parts[1] == "transports" and parts[2] != "base":
            return parts[2]
        return None

    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in _edges()
        if backend(e.source) and backend(e.target) and backend(e.source) != backend(e.target)
    ]
    assert not bad, bad


def test_import_keybus_loads_no_transport_client_cli_or_telemetry() -> None:
    probe = (
        "import sys, keybus\n"
        "heavy = ('keybus.transports', 'keybus.testing', 'keybus.cli', 'confluent_kafka',"
        " 'nats', 'rich', 'typer', 'pytest', 'matplotlib', 'keybus.telemetry',"
        " 'prometheus_client', 'opentelemetry')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_graph_reader_sees_imports() -> None:
    """The checks above are only as good as the edges found: known ones must be there."""
    found = {(e.source, e.target, e.typing_only) for e in _edges()}
    assert ("keybus.bus", "keybus.engine", False) in found
    assert ("keybus.bus", "keybus.transports.base", True) in found
    assert ("keybus.transports.memory", "keybus.transports.base", False) in found

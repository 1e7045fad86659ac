"""Every tnexp module imports on its own, and the module-level imports form no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tnexp

ROOT = Path(tnexp.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """tnexp modules imported by ``name`` at module level or inside functions."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ too: an edge to each package, except
    # to the module's own packages (Python initialises those before the module anyway).
    for name, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            for i in range(2, len(parts)):
                package = ".".join(parts[:i])
                if package in known and not name.startswith(f"{package}."):
                    deps.add(package)
        deps.discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_tnexp_modules():
    """Counting in-function imports too: none may hide a cycle (package __init__ re-exports
    of their own submodules excepted, which is how a package exposes its parts)."""
    graph = _graph()
    for name, deps in graph.items():  # a package importing its own submodules is no cycle
        graph[name] = {d for d in deps if not d.startswith(f"{name}.")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

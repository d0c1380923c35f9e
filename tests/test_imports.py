"""Imports point down: every selfcascade module imports, and no chain of imports leads back to where it started.

The graph is read from the source (``ast``), so it sees what running code can hide: imports inside functions
(lazy ones) and under ``if TYPE_CHECKING:`` count as edges too, since either way one module needs the other.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import selfcascade

PACKAGE_DIR = Path(selfcascade.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("selfcascade", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The selfcascade modules ``module`` imports anywhere in its source (``from pkg import sub`` -> pkg.sub)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


def import_graph() -> dict[str, set[str]]:
    return {module: _imported(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_modules():
    graph = import_graph()
    assert "selfcascade.unet_layout" in graph["selfcascade.upsamplers"]  # from .unet_layout import ...
    assert {"selfcascade.data.emoji", "selfcascade.data.emoji_clips"} <= graph["selfcascade.data.commands"]
    assert "selfcascade.io" in graph["selfcascade.data.emoji"]  # from ..io import ...


def test_selfcascade_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))  # __main__ runs the CLI
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ImportError as exc:  # an optional extra that is not installed here, never a selfcascade module
        if (exc.name or "").startswith("selfcascade"):
            raise
        pytest.skip(f"{module} needs {exc.name}, not installed")

"""Print Loom's import layers from the code's own imports, and fail on a cycle or an import that runs up the layers.

    python scripts/import_layers.py            # the layers, each package's imports, then OK or the violations

Every ``import loom.x`` / ``from loom.x import ...`` in loom/ counts, at module level or inside a function (a local
import still ties the two together). A package may import from its own package and from lower layers only; two
packages of the same layer do not import each other. The package facade ``loom/__init__.py`` (it re-exports ``LLM``
and ``SamplingParams`` lazily) and ``loom/cli.py`` (it imports subcommands by name) are the two documented
exceptions. tests/test_layers.py runs this check.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["loom", "loom.tokenization", "loom.devices", "loom.flags"]),
    ("kernels; the server host", ["loom.ops", "loom.server", "loom.distributed"]),
    ("models", ["loom.models"]),
    ("engine", ["loom.engine"]),
    ("capabilities", ["loom.entrypoints", "loom.batching", "loom.image", "loom.finetune"]),
    ("tools", ["loom.bench"]),
    ("command line", ["loom.cli"]),
]
FACADES = {"loom", "loom.cli"}
"""Modules whose imports are not checked (see the module docstring)."""


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def imports(path: Path) -> set[str]:
    """Every loom module this file names in an import statement."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loom"}
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "loom"):
            found.add(node.module)
    return found


def module_graph(root: Path) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p) for p in sorted(root.rglob("*.py"))}


def layer_of(package: str) -> int:
    for index, (_, packages) in enumerate(LAYERS):
        if package in packages:
            return index
    raise KeyError(f"{package} is in no layer: add it to LAYERS in scripts/import_layers.py")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module in FACADES:
            continue
        here = package_of(module)
        for target in sorted(targets):
            there = package_of(target)
            if there == here:
                continue
            if layer_of(there) > layer_of(here):
                found.append(f"upward: {module} imports {target} ({LAYERS[layer_of(there)][0]} is above "
                             f"{LAYERS[layer_of(here)][0]})")
            elif layer_of(there) == layer_of(here):
                found.append(f"sideways: {module} imports {target} (both are {LAYERS[layer_of(here)][0]})")
    return found + [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def report(graph: dict[str, set[str]]) -> str:
    uses: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        uses[package_of(module)] |= {package_of(t) for t in targets} - {package_of(module)}
    lines = []
    for index, (name, packages) in reversed(list(enumerate(LAYERS))):
        lines.append(f"{index} {name}")
        for package in packages:
            lines.append(f"    {package:18s} imports {', '.join(sorted(uses.get(package, ()))) or '-'}")
    return "\n".join(lines)


def main() -> int:
    root = Path(__file__).resolve().parents[1] / "loom"
    graph = module_graph(root)
    print(report(graph))
    found = violations(graph)
    print("\n".join(found) if found else f"OK: {len(graph)} modules, no cycle, no import up or sideways")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's shape: imports (also those inside functions) form no cycle and never run upward,
no module reaches into another's private names, no module outgrows one responsibility."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cl_flat"

# bottom to top: a module may import only from its own level or below (same level: no cycle)
LEVELS = [
    {"errors", "files", "seeding", "overrides", "host_memory", "registry", "progress"},
    {"config"},
    {"family"},
    {"dist", "lora_layers", "loss", "metrics", "data", "stats"},
    {"models", "adapters", "checkpoint", "flatness", "olora", "plots", "tracking"},
    {"rundir", "evaluate"},
    {"landscape", "train", "report"},
    {"bench"},
    {"recipes"},  # the workflows users run (cl_flat.recipes), above the library
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported cl_flat module, imported names) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cl_flat"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("cl_flat")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            # `from cl_flat.x import y` imports module cl_flat.x.y when that is a module
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            graph[name].update(h for h in hits if h != name)
    return graph


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_import_runs_upward():
    graph = _graph()
    tops = {_top(m) for m in graph} - {""}
    assert tops <= set(LEVEL), f"place these modules in LEVELS: {sorted(tops - set(LEVEL))}"
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if _top(a) and _top(b) and _top(a) != _top(b) and LEVEL[_top(b)] > LEVEL[_top(a)]]
    assert not upward, upward


def test_no_private_name_crosses_a_module():
    reached = [(str(p.relative_to(PACKAGE)), target, n) for p in PACKAGE.rglob("*.py")
               for target, names in _imports(p) for n in names if n.startswith("_") and n != "__version__"]
    assert not reached, reached


def test_no_module_outgrows_one_responsibility():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 450, {k: v for k, v in sizes.items() if v > 450}

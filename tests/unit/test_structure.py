"""The package's shape: imports (also those inside functions) form no cycle and never run upward,
no module reaches into another's private names, no module outgrows one responsibility."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cl_flat"

# bottom to top: a module may import only from its own level or below (same level: no cycle)
LEVELS = [
    {"errors", "files", "seeding", "overrides", "host_memory", "registry", "schedules", "progress", "stopping",
     "rank_log"},
    {"config"},
    {"family"},
    {"dist", "lora_layers", "loss", "metrics", "matrix_csv", "data", "stats", "opcount", "precision"},
    {"models", "adapters", "checkpoint", "flatness", "strategies", "plots", "tracking"},
    {"rundir", "evaluate"},
    {"landscape", "train", "report"},
    {"bench"},
    {"recipes"},  # the workflows users run (cl_flat.recipes), above the library
    {"cli", "console", "exits"},  # the command line, how it looks and how it ends
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


# ---------------------------------------------------------------- unit tests start nothing

UNIT_TESTS = PACKAGE.parent / "tests" / "unit"
# modules that start processes: a unit test imports none of them
PROCESS_MODULES = {"subprocess", "multiprocessing", "torch.multiprocessing", "pty", "concurrent.futures"}
# what starts a process, a process group or a DeepSpeed engine, by name (called or imported) ...
STARTERS = {"run_cli", "Popen", "init_distributed", "init_process_group", "create_engine", "train_task",
            "run_sequence", "run_reference", "reevaluate"}
# ... or as module.function
QUALIFIED_STARTERS = {("deepspeed", "initialize"), ("bench", "measure"), ("bench", "_run_variant"), ("os", "system"),
                      ("os", "fork"), ("os", "execv"), ("os", "execvp"), ("os", "posix_spawn"), ("mp", "spawn")}


def _starts(path: Path) -> list[str]:
    """What a test module imports or calls that starts a process, a process group or an engine."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in PROCESS_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.module in PROCESS_MODULES:
                found.append(f"from {node.module} import ...")
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in STARTERS]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in STARTERS:
                found.append(f"{func.id}()")
            elif isinstance(func, ast.Attribute) and (func.attr in STARTERS or (
                    isinstance(func.value, ast.Name) and (func.value.id, func.attr) in QUALIFIED_STARTERS)):
                found.append(f"{ast.unparse(func)}()")
    return [f"{path.name}:{line}" for line in found]


def test_unit_tests_start_no_process_and_no_engine():
    """tests/unit holds the tests that start nothing (marked `unit`); whatever starts a subprocess, a process
    group or a DeepSpeed engine lives in tests/integration (marked `integration`). conftest.py of tests/unit
    refuses a process group at run time."""
    found = [hit for path in sorted(UNIT_TESTS.glob("*.py")) for hit in _starts(path)]
    assert not found, found


def test_the_unit_guard_sees_each_starter(tmp_path):
    module = tmp_path / "test_example.py"
    module.write_text("import subprocess\nfrom helpers import run_cli\nfrom cl_flat import dist, bench\n"
                      "import deepspeed\n\ndef test_x():\n    dist.init_distributed()\n    deepspeed.initialize()\n"
                      "    bench.measure('c', 'sam', 1, 0)\n    run_cli(['train'])\n")
    assert _starts(module) == ["test_example.py:import subprocess", "test_example.py:from helpers import run_cli",
                               "test_example.py:dist.init_distributed()", "test_example.py:deepspeed.initialize()",
                               "test_example.py:bench.measure()", "test_example.py:run_cli()"]


def test_test_files_have_unique_names():
    """pytest imports test modules by their basename (no packages under tests/): two files of one name in
    unit/ and integration/ stop the whole collection."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})

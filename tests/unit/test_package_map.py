"""The package map (the `cl_flat/` block under "The package" in docs/internals.md) matches the tree: every module and
package at the top of cl_flat/ appears in it, and every name in it exists where the map puts it.

How the map reads: each line indented by two spaces is an entry, lines indented further continue it. An
entry starts with its names (`cli.py`, `config/`, or a list `models.py, loss.py, data/`), each at the top of
cl_flat/. The names in its description (`x.py`, `y/`) are inside the package when the entry names one
package alone (`config/  sections.py: ...`), and at the top of cl_flat/ otherwise (`seeding.py  ...;
dist.py: ...`)."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cl_flat"
MAP_DOC = PACKAGE.parent / "docs" / "internals.md"
NAME = re.compile(r"(?<![\w./-])(\w+\.py|\w+/)(?![\w/])")
HEAD = re.compile(r"  ((?:\w+\.py|\w+/)(?:, (?:\w+\.py|\w+/))*)(.*)")


def package_map(text: str) -> list[str]:
    """The lines of the fenced block that starts with `cl_flat/`, that line left out."""
    blocks = re.findall(r"^```\n(cl_flat/\n.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1, f"docs/internals.md holds {len(blocks)} package maps (a ``` block starting with cl_flat/)"
    return blocks[0].splitlines()[1:]


def entries(lines: list[str]) -> list[tuple[list[str], str]]:
    """(the names an entry starts with, the rest of its text) for each entry of the map."""
    found: list[tuple[list[str], str]] = []
    for line in lines:
        if line.startswith("   ") and found:
            found[-1] = (found[-1][0], found[-1][1] + " " + line.strip())
            continue
        match = HEAD.fullmatch(line)
        assert match, f"not an entry of the package map (names, then what they hold): {line!r}"
        found.append((match.group(1).split(", "), match.group(2)))
    return found


def resolve(lines: list[str]) -> tuple[set[str], list[str]]:
    """(the top-level names the map mentions, the names in it that do not exist where it puts them)."""
    top, missing = set(), []
    for heads, rest in entries(lines):
        for name in heads:
            top.add(name)
            if not (PACKAGE / name).exists():
                missing.append(name)
        inner = PACKAGE / heads[0] if len(heads) == 1 and heads[0].endswith("/") else None
        for name in NAME.findall(rest):
            if inner is None:
                top.add(name)
                if not (PACKAGE / name).exists():
                    missing.append(name)
            elif not any(p.name == name.rstrip("/") for p in inner.rglob(name.rstrip("/"))):
                missing.append(f"{heads[0]}{name}")
    return top, missing


def top_level() -> set[str]:
    """The modules and packages at the top of cl_flat/."""
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def test_every_top_level_module_is_in_the_map_and_every_name_in_it_exists():
    mentioned, missing = resolve(package_map(MAP_DOC.read_text(encoding="utf-8")))
    assert not missing, f"the package map in docs/internals.md names what does not exist there: {missing}"
    absent = sorted(top_level() - mentioned)
    assert not absent, f"the package map in docs/internals.md leaves out: {absent}"


def test_the_map_reader_catches_a_misplaced_or_missing_name():
    lines = ["  cli.py         the commands", "  config/        sections.py: the schema;",
             "                 overrides.py (--set)", "  seeding.py     seeds; dist.py: collectives",
             "  models.py, data/, nowhere.py"]
    mentioned, missing = resolve(lines)
    assert missing == ["config/overrides.py", "nowhere.py"]
    assert {"cli.py", "config/", "seeding.py", "dist.py", "models.py", "data/"} <= mentioned
    assert "overrides.py" not in mentioned  # named inside config/, where it is not

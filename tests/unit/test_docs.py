"""README.md, docs/ and the READMEs of configs/, examples/ and results/ stay true to the repository:
every relative link points to an existing file (and heading), every repository path they name exists,
every `cl-flat` command they show exists with the options shown, and the README stays short enough
for a newcomer.

What counts as a path: a token in code (inline `...` or a fenced block) starting with one of the
repository's folders (configs/, launch/, cl_flat/, ...). `{a,b}` is expanded; a path with a
placeholder or glob (`<run>`, `*`, `$X`) must exist up to the folder before it; the folder a command
writes (`--out DIR`) is an output, not checked. A `cl-flat` command is checked where it is shown in
code: its name (and a group's subcommand) must be registered in the typer app, and each `--option`
after it must be one of that command's options (`cl-flat train` also takes dotted config keys,
`--training.learning_rate=...`, the wandb agent form)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from cl_flat.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_FILES = sorted((ROOT / "docs").glob("*.md"))
# and the hand-written READMEs beside configs, examples and results (not the generated report.md files)
FOLDER_READMES = sorted(p for top in ("configs", "examples", "results") for p in (ROOT / top).rglob("README.md"))
DOCS = [README, *DOC_FILES, *FOLDER_READMES]
README_MAX_LINES = 260

ROOTS = ("configs", "launch", "cl_flat", "results", "docs", "examples", "tests")
PATH = re.compile(r"(?<![\w./@-])((?:" + "|".join(ROOTS) + r")/(?:[^\s`'\"()\[\],;|{]|{[^}\s]*})*)")
# folders the docs name that a user creates, never committed
USER_MADE = {"launch/wheels/"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w-])cl-flat ([a-z][a-z-]*)((?: [a-z][a-z-]*)?)((?:(?!cl-flat ).)*)")
# where a shown command ends: a shell comment, a pipe, a second command
COMMAND_END = re.compile(r"\s#(?:\s|$)|&&|\|\||;|\s\|\s")
OPTION = re.compile(r"(?<![\w-])(--[a-zA-Z][\w.-]*)")


def code_pieces(text: str) -> list[str]:
    """The text shown as code: each line of every fenced block, and every inline code span outside them."""
    pieces = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return pieces + INLINE.findall(FENCE.sub("", text))


def expand_braces(path: str) -> list[str]:
    match = re.search(r"{([^{}]*,[^{}]*)}", path)
    if not match:
        return [path]
    return [p for alt in match.group(1).split(",")
            for p in expand_braces(path[:match.start()] + alt + path[match.end():])]


def missing_path(path: str, root: Path) -> str | None:
    """None when `path` (relative to root) exists as the docs use it, else the part that does not."""
    for candidate in expand_braces(path.rstrip(".:")):
        wild = re.search(r"[<*$]", candidate)
        if wild:
            candidate = candidate[:wild.start()].rsplit("/", 1)[0]
        if not (root / candidate).exists():
            return candidate
    return None


def path_problems(text: str, root: Path) -> list[str]:
    problems = []
    for piece in code_pieces(text):
        outputs = set(re.findall(r"--out[ =](\S+)", piece))
        for path in PATH.findall(piece):
            if path not in outputs | USER_MADE and (missing := missing_path(path, root)):
                problems.append(f"path {path!r} does not exist ({missing})")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h.replace("`", "")) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", text), re.M)}


def link_problems(text: str, doc: Path) -> list[str]:
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: outside the repository
        file_part, _, anchor = target.partition("#")
        file = (doc.parent / file_part).resolve() if file_part else doc
        if not file.exists():
            problems.append(f"link {target!r}: no file {file_part}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            problems.append(f"link {target!r}: no heading #{anchor} in {file.name}")
    return problems


def command_problems(text: str, root_group) -> list[str]:
    """`root_group`: the click command of the typer app (typer ships its own click, so groups and
    arguments are told by their attributes)."""
    problems = []
    commands = dict(root_group.commands)
    for piece in code_pieces(text):
        for name, sub, rest in COMMAND.findall(piece):
            command = commands.get(name)
            shown = f"cl-flat {name}"
            if command is None:
                problems.append(f"{shown!r}: no such command (commands: {sorted(commands)})")
                continue
            if hasattr(command, "commands"):  # a group: `cl-flat data prepare`
                sub = sub.strip()
                if sub not in command.commands:
                    problems.append(f"'{shown} {sub}': no such subcommand (subcommands: {sorted(command.commands)})")
                    continue
                command, shown = command.commands[sub], f"{shown} {sub}"
            else:
                rest = sub + rest
            rest = COMMAND_END.split(rest)[0]
            words = rest.split()
            if words and not words[0].startswith(("-", "[")) and not any(
                    p.param_type_name == "argument" for p in command.params):
                problems.append(f"{shown!r}: takes no argument, shown with {words[0]!r}")
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
            extra_keys = bool(command.context_settings.get("allow_extra_args"))
            for option in OPTION.findall(rest):
                name_only = option.split("=", 1)[0]
                if name_only not in known and not (extra_keys and "." in name_only):
                    problems.append(f"{shown!r}: no option {name_only} (options: {sorted(known)})")
    return problems


def problems_of(doc: Path, root_group) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    return path_problems(text, ROOT) + link_problems(text, doc) + command_problems(text, root_group)


def shown_runs(text: str) -> list[tuple[str, list[str]]]:
    """(config path, its `--set` overrides) of each `cl-flat train|validate|bench CONFIG` shown with a
    repository config; overrides holding a shell variable or a placeholder are left out."""
    runs = []
    for piece in code_pieces(text):
        for name, sub, rest in COMMAND.findall(piece):
            words = COMMAND_END.split(sub + rest)[0].split()
            config = words[0] if words else ""
            if name in ("train", "validate", "bench") and PATH.fullmatch(config) and config.endswith(".yaml") \
                    and not re.search(r"[$<*]", config):
                overrides = [v for k, v in zip(words, words[1:]) if k == "--set" and not re.search(r"[$<]", v)]
                runs.append((words[0], overrides))
    return runs


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_the_configs_a_doc_runs_validate_with_the_overrides_shown(doc: Path):
    from cl_flat.config import load_config

    for path, overrides in shown_runs(doc.read_text(encoding="utf-8")):
        load_config(ROOT / path, overrides)  # a ConfigError names the problem


@pytest.fixture(scope="module")
def cli():
    return typer.main.get_command(app)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_paths_and_commands_of_a_doc_exist(doc: Path, cli):
    problems = problems_of(doc, cli)
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_readme_is_short_and_links_every_doc():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n") + 1
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"
    unlinked = [d.name for d in DOC_FILES if f"(docs/{d.name}" not in text]
    assert not unlinked, f"README.md links no docs/ file named {unlinked}"


def test_the_checks_catch_a_broken_doc(tmp_path: Path, cli):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a1.yaml").write_text("")
    (tmp_path / "other.md").write_text("# Real heading\n")
    doc = tmp_path / "README.md"
    text = ("See [other](other.md#real-heading), [gone](nothere.md) and [bad anchor](other.md#nope).\n"
            "Run `configs/a{1,2}.yaml` or `configs/<name>.yaml`; `cl-flat report x --out results/new`.\n"
            "```bash\n"
            "cl-flat train configs/a1.yaml --set a=1 --flatness.rho=0.1 --resum   # --not-an-option in a comment\n"
            "cl-flat trian CONFIG\n"
            "cl-flat data prepare long --out d --sauce hub\n"
            "cl-flat data fetch long\n"
            "cl-flat methods rwp\n"
            "cl-flat metrics M.csv --json && cl-flat eval RUN_DIR --nope\n"
            "```\n")
    doc.write_text(text)
    assert path_problems(text, tmp_path) == ["path 'configs/a{1,2}.yaml' does not exist (configs/a2.yaml)"]
    assert link_problems(text, doc) == ["link 'nothere.md': no file nothere.md",
                                        "link 'other.md#nope': no heading #nope in other.md"]
    assert shown_runs(text) == [("configs/a1.yaml", ["a=1"])]
    found = command_problems(text, cli)
    assert [p.split(" (")[0] for p in found] == [
        "'cl-flat train': no option --resum", "'cl-flat trian': no such command",
        "'cl-flat data prepare': no option --sauce", "'cl-flat data fetch': no such subcommand",
        "'cl-flat methods': takes no argument, shown with 'rwp'", "'cl-flat eval': no option --nope"]

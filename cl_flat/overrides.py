"""Dotted config keys: command-line overrides `a.b.c=value` (applied to the raw YAML dict before validation) in
every form a wandb agent writes them, the flat view of a config as dotted keys, and run names templated from them."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import BaseModel

from cl_flat.errors import ConfigError


class _ValueLoader(yaml.SafeLoader):
    """YAML, plus what a wandb agent writes with Python's str(): `None` is null, `1e-05` a float (YAML 1.1
    wants a dot)."""


_ValueLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])
_ValueLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


TEXT_KEYS = {"run.name"}  # a name template "{flatness}-s{run.seed}" would read as a YAML mapping


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value); the value is parsed as YAML (and `None`, `1e-05` as
    Python writes them), but that of a key in TEXT_KEYS is taken as written unless quoted."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"override {text!r}: expected KEY.PATH=VALUE, e.g. training.learning_rate=5e-4"])
    if key in TEXT_KEYS and not (len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\""):
        return key.split("."), raw
    try:
        value = yaml.load(raw, Loader=_ValueLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError("--set", [f"override {text!r}: value is not valid YAML ({exc.problem})"]) from None
    return key.split("."), value


def overrides_from_args(args: list[str]) -> list[str]:
    """The overrides among a command's extra arguments, in order, as `KEY=VALUE`, from each form a wandb agent
    writes: `--KEY=VALUE` (${args}), `--KEY VALUE` (${args_no_equals}) and `KEY=VALUE` (${args_no_hyphens})."""
    overrides, problems = [], []
    position = 0
    while position < len(args):
        token = args[position]
        if token.startswith("--") and "=" in token:
            overrides.append(token[2:])
        elif token.startswith("--"):
            if position + 1 < len(args) and not args[position + 1].startswith("--"):
                position += 1
                overrides.append(f"{token[2:]}={args[position]}")
            else:
                problems.append(f"{token}: no value; expected --KEY=VALUE or --KEY VALUE")
        elif "=" in token and not token.startswith("-"):
            overrides.append(token)
        else:
            problems.append(f"unexpected argument {token!r}: expected an override KEY=VALUE, --KEY=VALUE or "
                            "--KEY VALUE after CONFIG")
        position += 1
    if problems:
        raise ConfigError("of cl-flat train", problems, kind="arguments")
    return overrides


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted key each override sets."""
    return [".".join(parse_override(text)[0]) for text in overrides]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted path in the raw dict; list items are addressed by index (tasks.0.name)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError("--set", [f"override {text!r}: {where} is not an index of a list of {len(node)}"])
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError("--set", [f"override {text!r}: {where} is not a section"])
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError("--set", [f"override {text!r}: {last} is not an index of a list of {len(node)}"])
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError("--set", [f"override {text!r}: {'.'.join(path[:-1])} is not a section"])
    return raw


def dotted_keys(tree: dict[str, Any] | list[Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys: {"a": {"b": 1}, "tasks": [{"name": "x"}]} -> {"a.b": 1, "tasks.0.name": "x"}.
    Lists of plain values (target_modules) and empty mappings stay values."""
    flat: dict[str, Any] = {}
    for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if (isinstance(value, dict) and value) or (isinstance(value, list) and value and all(
                isinstance(v, dict) for v in value)):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- run names templated from dotted keys: run.name: "{flatness.method}-s{run.seed}"

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# the names a config gives, one home for each pattern: a task's name, a run's folder name (a filled run.name),
# and the run.name template that gives one ({dotted.key} placeholders among the folder name's characters)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"
NAME_CHARS = r"A-Za-z0-9_.\-"
RUN_NAME = rf"^[A-Za-z0-9][{NAME_CHARS}]*$"
_KEY = r"\{[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\}"
RUN_NAME_TEMPLATE = rf"^(?:[A-Za-z0-9]|{_KEY})(?:[{NAME_CHARS}]|{_KEY})*$"
KEYS_OUTSIDE_A_NAME = ("run.name", "run.output_dir", "logging")  # they never change a run's results


def template_keys(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)


def _lookup(config: BaseModel, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def _name_part(value: Any) -> str:
    """A value as it appears in a name: true/false/null, floats by repr, list items joined by `_`; a section
    (`{flatness}`) as its values that differ from the defaults, `key` + value, joined by `-`, a required value
    (flatness.method, tasks.0.name) alone: {method: sam, rho: 0.1} -> sam-rho0.1; all defaults -> default."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        shown = value.model_dump(mode="json", exclude_defaults=True)
        parts = [_name_part(item) if fields[key].is_required() else f"{key}{_name_part(item)}"
                 for key, item in shown.items()]
        return "-".join(parts) or "default"
    if isinstance(value, dict):
        return "-".join(f"{key}{_name_part(item)}" for key, item in dotted_keys(value).items()) or "default"
    if isinstance(value, (list, tuple)):
        return "_".join(_name_part(item) for item in value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def fill_name_template(template: str, config: BaseModel) -> tuple[str, list[str]]:
    """(the name, problems): each `{dotted.key}` replaced by that key's value in the validated config, or a
    section's non-default values (`_name_part`); characters a folder name should not hold become `_`."""
    problems: list[str] = []

    def value(match: re.Match) -> str:
        key = match.group(1)
        try:
            if key == "run.name":
                raise KeyError(key)
            return re.sub(rf"[^{NAME_CHARS}]", "_", _name_part(_lookup(config, key)))
        except KeyError:
            problems.append(f"run.name: {{{key}}} is not a key of this config (use its dotted keys, e.g. "
                            "{flatness.method}, {run.seed}, or a section: {flatness})")
            return ""

    name = PLACEHOLDER.sub(value, template)
    if not problems and not re.match(RUN_NAME, name):
        problems.append(f"run.name: {template!r} gives {name!r}, not a folder name ({RUN_NAME})")
    return name, problems


def names_every_key(template: str, keys: list[str]) -> bool:
    """Whether the template names each key (itself or a section holding it), run.name, run.output_dir and
    logging.* aside: then runs that differ in those keys get different names."""
    named = set(template_keys(template))

    def named_or_outside(key: str) -> bool:
        parts = key.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return bool(prefixes & named) or any(key == k or key.startswith(k + ".") for k in KEYS_OUTSIDE_A_NAME)

    return all(named_or_outside(key) for key in keys)


def with_task_settings(raw: dict[str, Any], lora_weights: dict[str, Any]) -> dict[str, Any]:
    """Each task's `training`, `flatness` and `lora` blocks merged onto the run-level ones, so a task's
    block validates (at `tasks.<i>.training.<field>`) and is saved as its effective settings. A task's
    flatness block naming another method replaces the run-level block (that method's defaults); its
    lora block (O-LoRA's λ) is merged onto `lora_weights`, the run's λ with their defaults."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, list):
        return raw
    run_lora = raw.get("lora") if isinstance(raw.get("lora"), dict) else {}
    weights = {k: run_lora.get(k, default) for k, default in lora_weights.items()}
    defaults = {"training": {}, "flatness": {"method": "none"}, "lora": weights}
    merged = []
    for task in tasks:
        if isinstance(task, dict):
            task = dict(task)
            for section, default in defaults.items():
                own, base = task.get(section), raw.get(section)
                base = default if section == "lora" or not isinstance(base, dict) else base
                if isinstance(own, dict):
                    same_method = section != "flatness" or own.get("method", base.get("method")) == base.get("method")
                    task[section] = {**base, **own} if same_method else own
        merged.append(task)
    return {**raw, "tasks": merged}

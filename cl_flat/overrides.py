"""Dotted config keys: command-line overrides `a.b.c=value` (applied to the raw YAML dict before validation)
and the flat view of a config as dotted keys."""

from __future__ import annotations

from typing import Any

import yaml

from cl_flat.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"override {text!r}: expected KEY.PATH=VALUE, e.g. training.learning_rate=5e-4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError("--set", [f"override {text!r}: value is not valid YAML ({exc.problem})"]) from None
    return key.split("."), value


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


def with_task_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Each task's `training` and `flatness` blocks merged onto the run-level ones, so a task's block
    validates (at `tasks.<i>.training.<field>`) and is saved as its effective settings. A task's
    flatness block naming another method replaces the run-level block (that method's defaults)."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, list):
        return raw
    defaults = {"training": {}, "flatness": {"method": "none"}}
    merged = []
    for task in tasks:
        if isinstance(task, dict):
            task = dict(task)
            for section, default in defaults.items():
                own, base = task.get(section), raw.get(section)
                base = base if isinstance(base, dict) else default
                if isinstance(own, dict):
                    same_method = section != "flatness" or own.get("method", base.get("method")) == base.get("method")
                    task[section] = {**base, **own} if same_method else own
        merged.append(task)
    return {**raw, "tasks": merged}

"""Groups of finished runs for `cl-flat report`: which runs are one group, its label and its summaries;
reference runs' groups; the baseline group.

Grouping: runs whose resolved configs are equal once run.seed, run.name, run.output_dir, logging.*, the
tasks' and probes' data file paths (tasks.<i>.train / test / data_files) and the ORDER of the tasks are set aside form
one group ("meta" is never part of a config; a task's override blocks count as the values they change,
wherever in the sequence, see order_free): runs of the same tasks in different orders are one group, its
numbers averaged over the orders (the number O-LoRA reports); runs of different task sets are refused unless
--allow-mixed. `group_by` (dotted keys) groups by just those keys. A group's label is flatness.method plus
the keys whose values differ between groups (see group_runs), or the `group_by` keys, each value shortened
to one line (labels never hold a prompt template).

Per group and metric M over its n runs: its summary (cl_flat.stats; a metric null in any run is undefined for
the group), as cl_flat.report.build describes.

Reference runs (`cl-flat train --reference per_task|joint`, meta.reference in config.yaml) are not grouped
with the sequences: they form reference groups of their own (kind, settings), whose value is the mean over
tasks of their per-task scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cl_flat.config import flatness_adapter
from cl_flat.overrides import dotted_keys
from cl_flat.report.runs import ReferenceRun, ReportInputError, RunResult, comparable_settings, finite_number
from cl_flat.stats import Summary, summarize, summarize_defined

DEFAULT_BASELINE = "flatness.method=none"
UNSET = "(unset)"
TASK_KEY = re.compile(r"tasks\.(\d+)\.(.+)")
TASK_BLOCKS = ("training", "flatness", "lora")  # a task's overrides of the run-level sections
LABEL_WIDTH = 40


@dataclass
class ReferenceGroup:
    label: str                         # "reference <kind>" and the keys that differ between its groups
    kind: str
    runs: list[ReferenceRun]
    mean: Summary                      # over the runs of the mean score over tasks

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


@dataclass
class Group:
    label: str
    runs: list[RunResult]
    metrics: dict[str, Summary | None]  # None: undefined in some run
    op: list[Summary]                   # OP_t for t = 1..(shortest sequence in the group)

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    @property
    def orders(self) -> list[tuple[str, ...]]:
        """The task orders of its runs, each once."""
        return list(dict.fromkeys(run.tasks for run in self.runs))


def group_references(references: list[ReferenceRun]) -> list[ReferenceGroup]:
    """Reference runs grouped by kind and comparable settings; labelled by kind and the keys that differ."""
    buckets: dict[str, list[ReferenceRun]] = {}
    for ref in references:
        buckets.setdefault(_canonical([ref.kind, comparable_settings(ref.settings)]), []).append(ref)
    settings = [comparable_settings(members[0].settings) for members in buckets.values()]
    keys = list(dict.fromkeys(key for values in settings for key in values))
    differing = [key for key in keys if len({_canonical(values.get(key, UNSET)) for values in settings}) > 1]
    groups = []
    for members, values in zip(buckets.values(), settings):
        label = ", ".join([f"reference {members[0].kind}",
                           *(f"{k}={short_value(values[k])}" for k in differing if k in values)])
        groups.append(ReferenceGroup(label, members[0].kind, members, summarize([ref.mean for ref in members])))
    return sorted(groups, key=lambda group: group.label)


_canonical = functools.partial(json.dumps, sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else _canonical(value)  # true, null, 0.05, ["q_proj", "v_proj"]


def short_value(value: Any) -> str:
    """A value as one short line for a label: whitespace runs (newlines too) become one space; beyond
    LABEL_WIDTH characters, its start, "…" and 6 hex digits of its sha1 (two long values stay apart)."""
    text = " ".join(_format_value(value).split())
    if len(text) <= LABEL_WIDTH:
        return text
    return f"{text[:LABEL_WIDTH - 8]}…{hashlib.sha1(_format_value(value).encode()).hexdigest()[:6]}"


def order_free(settings: dict[str, Any]) -> dict[str, Any]:
    """comparable_settings, equal for runs of the same tasks in different orders: each task's own fields
    (tasks.<i>.<field>) renamed tasks.<name>.<field>; its override blocks (tasks.<i>.training / flatness /
    lora) reduced to the values that differ from the run-level section's (e.g. training.learning_rate=0.001)
    and gathered over all tasks into one sorted list, `tasks.overrides`: configs set them by position
    (O-LoRA's LLaMA scripts: a higher learning rate for whichever task comes first) and by task (MNLI's two
    epochs) alike, so neither the position nor the task of an override tells orders apart."""
    out: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in comparable_settings(settings).items():
        match = TASK_KEY.fullmatch(key)
        if not match:
            out[key] = value
        elif match[2].split(".")[0] in TASK_BLOCKS:
            if value is not None and _canonical(settings.get(match[2], UNSET)) != _canonical(value):
                overrides.append(f"{match[2]}={_format_value(value)}")
        else:
            out[f"tasks.{settings.get(f'tasks.{match[1]}.name', match[1])}.{match[2]}"] = value
    if overrides:
        out["tasks.overrides"] = sorted(overrides)
    return out


def _label_parts(settings: list[dict[str, Any]], differing: list[str]) -> tuple[list[str], dict[str, str]]:
    """The differing keys to show and, when the task sets differ, each bucket's "tasks=a,b" part: per-task
    keys of tasks not in every bucket are summarised by that part, never shown one by one."""
    name_sets = [frozenset(key.split(".")[1] for key in values if key.startswith("tasks.") and key != "tasks.overrides")
                 for values in settings]
    common = frozenset.intersection(*name_sets) if name_sets else frozenset()
    shown = [key for key in differing
             if not key.startswith("tasks.") or key == "tasks.overrides" or key.split(".")[1] in common]
    if len(set(name_sets)) == 1:
        return shown, {}
    return shown, {_canonical(values): "tasks=" + ",".join(sorted(names)) for values, names in zip(settings, name_sets)}


def group_runs(runs: list[RunResult], group_by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal order-free settings (or equal `group_by` values), sorted by label. The label
    shows the `group_by` keys, or flatness.method and each key whose value (or presence) differs between
    groups, in config order, except a method's parameter at its default that no other group sets otherwise;
    values shortened by short_value, different task sets by their names."""
    unknown = [key for key in group_by or [] if not any(key in run.settings for run in runs)]
    if unknown:
        raise ReportInputError(f"--group-by: no run has the key(s) {', '.join(unknown)}")
    buckets: dict[str, tuple[dict[str, Any], list[RunResult]]] = {}
    for run in runs:
        values = {k: run.settings.get(k, UNSET) for k in group_by} if group_by else order_free(run.settings)
        buckets.setdefault(_canonical(values), (values, []))[1].append(run)
    settings = [values for values, _ in buckets.values()]
    keys = list(dict.fromkeys(key for values in settings for key in values))
    differing = [key for key in keys if len({_canonical(values.get(key, UNSET)) for values in settings}) > 1]
    shown, task_sets = ([], {}) if group_by else _label_parts(settings, differing)
    label_keys = list(group_by) if group_by else list(dict.fromkeys(["flatness.method", *shown]))
    only_present = {key for key in differing if len({_canonical(v[key]) for v in settings if key in v}) == 1}
    groups = []
    for values, members in buckets.values():
        defaults = {} if group_by else dotted_keys(  # flatness.<parameter> -> its default for this method
            flatness_adapter().validate_python({"method": values["flatness.method"]}).model_dump(mode="json"),
            "flatness.")
        parts = [f"{k}={short_value(values[k])}" for k in label_keys
                 if k in values and not (k in only_present and defaults.get(k, UNSET) == values[k])]
        label = ", ".join(parts + ([task_sets[_canonical(values)]] if task_sets else []))
        steps = range(min(len(run.op) for run in members))
        metrics = {m: summarize_defined([run.metrics[m] for run in members]) for m in members[0].metrics}
        groups.append(Group(label, members, metrics, [summarize([run.op[t] for run in members]) for t in steps]))
    return sorted(groups, key=lambda group: group.label)


def _matches(value: Any, text: str) -> bool:
    """Whether a config value equals a command-line VALUE: numbers as numbers (5e-4 = 0.0005), booleans and
    null as YAML writes them (true, false, null), anything else as its text."""
    if finite_number(value):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return _format_value(value) == (text.lower() if isinstance(value, bool) or value is None else text)


def choose_baseline(groups: list[Group], specs: Sequence[str]) -> tuple[Group | None, list[str]]:
    """The group whose every run has KEY=VALUE for each spec (an error naming the key if none or several);
    without specs the one group with flatness.method=none, else (None, a note if several have it)."""
    conditions = []
    for spec in specs or [DEFAULT_BASELINE]:
        key, sep, text = (part.strip() for part in spec.partition("="))
        if not sep or not key:
            raise ReportInputError(f"--baseline {spec}: expected KEY=VALUE, e.g. {DEFAULT_BASELINE}")
        conditions.append((key, text))
    matching = [group for group in groups if all(_matches(run.settings.get(key, UNSET), text)
                                                 for key, text in conditions for run in group.runs)]
    if len(matching) == 1:
        return matching[0], []
    labels = "; ".join(group.label for group in matching)
    if not specs:
        return None, [f"no paired differences: {len(matching)} groups have {DEFAULT_BASELINE}"
                      f"{f' ({labels})' if matching else ''}; choose a baseline with --baseline KEY=VALUE"]
    if matching:
        raise ReportInputError(f"--baseline {' '.join(specs)} matches {len(matching)} groups ({labels}); "
                               "add another --baseline KEY=VALUE to choose one")
    present = {key: sorted({short_value(run.settings[key]) for g in groups for run in g.runs if key in run.settings})
               for key, _ in conditions}
    raise ReportInputError(f"--baseline {' '.join(specs)}: no group has " + "; ".join(
        f"{key}={text} (values of {key}: {', '.join(present[key]) or 'none, no run has this key'})"
        for key, text in conditions))

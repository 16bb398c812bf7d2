"""Typed run configuration: loading and validating the YAML schema of `cl_flat.config.sections`.

`load_config(path, overrides)` reads the YAML, applies `--set a.b=v` overrides to the raw dict
*before* validation, validates everything at once and raises `ConfigError` listing each problem
with its dotted path. Command options that are not part of a run's config (`cl-flat landscape`'s,
declared next to their command's code) are validated by the same machinery (`validate_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import TypeAdapter, ValidationError

from cl_flat.config.sections import (
    DEFAULT_TEMPLATE,
    BuiltinTaskConfig,
    DeepSpeedSection,
    EvaluationSection,
    FlatnessConfig,
    HfTaskConfig,
    JsonlTaskConfig,
    LoraSection,
    Metric,
    ModelSection,
    ReplaySection,
    RunConfig,
    Strict,
    TaskConfig,
    TrainingSection,
    WandbSection,
    flatness_adapter,
    template_fields,
    with_default_strategy,
)
from cl_flat.config.yamlfile import YamlProblem, read_yaml
from cl_flat.errors import ConfigError
from cl_flat.overrides import apply_overrides, fill_name_template, names_every_key, override_keys, with_task_settings
from cl_flat.registry import METHODS, STRATEGIES

__all__ = [
    "DEFAULT_TEMPLATE", "BuiltinTaskConfig", "DeepSpeedSection", "EvaluationSection", "FlatnessConfig",
    "HfTaskConfig", "JsonlTaskConfig", "LoraSection", "Metric", "ModelSection", "ReplaySection", "RunConfig", "Strict",
    "TaskConfig",
    "TrainingSection", "WandbSection", "config_to_dict", "flatness_adapter", "load_config", "resolve_paths",
    "template_fields", "validate_config", "validate_options", "with_evaluation_overrides",
]


TASK_SOURCES = {get_args(task.model_fields["source"].annotation)[0]
                for task in (BuiltinTaskConfig, JsonlTaskConfig, HfTaskConfig)}


UNION_MEMBER_LABELS = {"str", "int", "float", "bool"}


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    # drop the discriminator tag pydantic inserts into union locations (tasks.0.jsonl.train)
    tags = TASK_SOURCES | set(METHODS.names()) | set(STRATEGIES.names())
    loc = [p for p in loc if p not in tags or p == loc[-1]]
    # and the member labels of plain unions (data_files.str, data_files.list[str], ...)
    loc = [p for p in loc if "[" not in p and p not in UNION_MEMBER_LABELS]
    path = ".".join(loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "union_tag_invalid":  # the tag names the block's kind: the error is the tag's
        key = error["ctx"]["discriminator"].strip("'")
        path, tag = f"{path}.{key}", error["input"].get(key) if isinstance(error["input"], dict) else None
        message = f"Input should be one of {error['ctx']['expected_tags']} (got {tag!r})"
    elif error["type"] == "missing":
        message = "required field is missing"
    if "input" in error and error["type"] not in {"missing", "union_tag_invalid", "model_type"} \
            and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def _cross_checks(raw: dict[str, Any]) -> list[str]:
    """Checks that span sections, on the raw dict so they are reported together with the
    schema errors (a pydantic after-validator only runs when every field is valid)."""
    problems = []
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), list) else []
    names = [t["name"] for t in tasks if isinstance(t, dict) and isinstance(t.get("name"), str)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"tasks: duplicate task name(s) {duplicates}; names must be unique")
    model, deepspeed = raw.get("model"), raw.get("deepspeed")
    ds_bf16 = deepspeed.get("bf16", False) if isinstance(deepspeed, dict) else False
    try:
        ds_bf16 = TypeAdapter(bool).validate_python(ds_bf16)
    except ValidationError:
        ds_bf16 = True  # reported by the schema check already
    if isinstance(model, dict) and model.get("dtype") == "bf16" and not ds_bf16:
        problems.append("model.dtype: bf16 needs deepspeed.bf16: true (DeepSpeed keeps fp32 master weights)")
    evaluation = raw.get("evaluation")
    default_metric = (evaluation.get("metric") if isinstance(evaluation, dict) else None) \
        or EvaluationSection.model_fields["metric"].default
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    run_length = training.get("max_seq_length", TrainingSection.model_fields["max_seq_length"].default)
    for i, task in enumerate(tasks):
        own = task.get("training") if isinstance(task, dict) else None
        if isinstance(own, dict) and "max_seq_length" in own and own["max_seq_length"] != run_length:
            problems.append(f"tasks.{i}.training.max_seq_length: one length serves the whole run (every task is "
                            "evaluated after every task); set training.max_seq_length instead")
        problems += _labels_needed(task, f"tasks.{i}", "task", default_metric)
        if isinstance(task, dict) and task.get("source") == "jsonl" and task.get("train") is None:
            problems.append(f"tasks.{i}.train: a trained task needs its training file (only a probe may omit it)")
    return problems + _probe_checks(raw, names, default_metric)


def _labels_needed(entry: Any, path: str, noun: str, default_metric: str) -> list[str]:
    """A task or probe of a data file scored by rank classification must list its label strings."""
    if isinstance(entry, dict) and entry.get("source") in {"jsonl", "hf"} and entry.get("labels") is None \
            and (entry.get("metric") or default_metric) == "accuracy":
        return [f"{path}.labels: metric 'accuracy' (rank classification) needs the {noun}'s label strings; "
                "list them or set metric: exact_match or rouge_l"]
    return []


PROBE_UNTRAINED_KEYS = ("training", "flatness", "lora", "max_train_samples")  # a probe is never trained


def _probe_checks(raw: dict[str, Any], task_names: list[str], default_metric: str) -> list[str]:
    """A probe (`probes:`) is a task scored but never trained: its name is its own, it has no training keys."""
    probes = raw.get("probes") if isinstance(raw.get("probes"), list) else []
    problems, seen = [], set(task_names)
    for i, probe in enumerate(probe for probe in probes if isinstance(probe, dict)):
        name = probe.get("name")
        if isinstance(name, str) and name in seen:
            what = "a task's" if name in task_names else "another probe's"
            problems.append(f"probes.{i}.name: {name!r} is {what} name; a probe's name must differ from every "
                            "task's and probe's")
        seen.add(name)
        problems += [f"probes.{i}.{key}: a probe is never trained; remove this key" for key in PROBE_UNTRAINED_KEYS
                     if probe.get(key) is not None]
        problems += _labels_needed(probe, f"probes.{i}", "probe", default_metric)
    return problems


def _raw_lora(raw: dict[str, Any]) -> dict[str, Any]:
    return raw.get("lora") if isinstance(raw.get("lora"), dict) else {}


def _strategy_checks(raw: dict[str, Any]) -> list[str]:
    """The rules of every registered CL strategy (`Strategy.check`) on the raw config."""
    chosen = with_default_strategy(_raw_lora(raw))["strategy"]
    return [p for entry in STRATEGIES.load().values() for p in entry.cls.check(raw, chosen)]


def _task_lora_base(raw: dict[str, Any]) -> dict[str, Any]:
    """What a task's own `lora` block is merged onto: the run's values of the keys a strategy lets a
    task set (its `task_config`: O-LoRA's λ), their defaults where the run sets none."""
    lora = _raw_lora(raw)
    return {key: lora.get(key, entry.config_class.model_fields[key].default) for entry in STRATEGIES.load().values()
            if getattr(entry.cls, "task_config", None) is not None for key in entry.cls.task_config.model_fields}


def _problems(exc: ValidationError, names: dict[str, str] | None = None) -> list[str]:
    """One line per invalid path (its messages joined); `names` renames top-level paths (field -> --flag)."""
    merged: dict[str, list[str]] = {}
    for error in exc.errors():
        path, _, message = _describe(error).partition(": ")
        path = (names or {}).get(path, path)
        if message not in merged.setdefault(path, []):
            merged[path].append(message)
    return [f"{path}: {' or '.join(messages)}" for path, messages in merged.items()]


def validate_options(model: type[Strict], values: dict[str, Any], source: str, flags: dict[str, str]):
    """A command's options validated like a config section; errors name the option (`flags`: field -> --flag)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc, flags), kind="options") from None


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections (run, model, tasks, ...)"])
    problems: list[str] = []
    try:
        config = RunConfig.model_validate(with_task_settings(raw, _task_lora_base(raw)))
    except ValidationError as exc:
        problems = _problems(exc)
    else:
        config.run.name, problems = fill_name_template(config.run.name, config)
    problems += _cross_checks(raw) + _strategy_checks(raw)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None, sweep_run_id: str | None = None) -> RunConfig:
    """The validated config of a YAML file with `overrides` applied, its run.name template filled. Under a
    sweep (`sweep_run_id`: the wandb run id) "-<id>" is appended unless the template names every key the
    overrides set (`names_every_key`), so that two runs of one sweep never share a results folder."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"  # a run folder: the config it saved
    if not path.is_file():
        what = "is a folder without config.yaml" if path.is_dir() else "file not found"
        raise ConfigError(str(path), [f"{path}: {what}"])
    try:
        raw = read_yaml(path)
    except YamlProblem as exc:
        raise ConfigError(str(path), [str(exc)]) from None
    saved = isinstance(raw, dict) and isinstance(raw.get("meta"), dict)  # a run's own config.yaml
    if saved:
        raw = stored_run_config(raw, path.parent)
    raw = apply_overrides(raw if raw is not None else {}, overrides or [])
    config = validate_config(raw, str(path))
    template = raw["run"]["name"] if "name" in (raw.get("run") or {}) else config.run.name
    if sweep_run_id and not saved and not names_every_key(template, override_keys(overrides or [])):
        config.run.name = f"{config.run.name}-{sweep_run_id}"
    return resolve_paths(config, path.parent)


def stored_run_config(document: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config a run saved in `folder`/config.yaml, without its meta, naming that folder as the run's
    (output_dir = its parent, run.name = its name): `cl-flat train RUN_DIR --resume` continues that run
    wherever it was moved and whatever the working directory."""
    raw = {key: value for key, value in document.items() if key != "meta"}
    run = dict(raw.get("run") or {}) if isinstance(raw.get("run") or {}, dict) else raw.get("run")
    if isinstance(run, dict):
        folder = folder.resolve()
        raw["run"] = run | {"output_dir": str(folder.parent), "name": folder.name}
    return raw


def _resolve(value: str | Path, base: Path) -> str | Path:
    path = Path(value)
    if path.is_absolute():
        return value
    chosen = base / path if (base / path).exists() else path
    return type(value)(chosen.resolve())


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Relative data paths are relative to the config file's folder when they exist there,
    else to the working directory (how users expect `data/x.jsonl` next to the YAML to work).
    They are stored absolute, so a saved run config works from any directory (cl-flat eval)."""
    for task in [*config.tasks, *config.probes]:
        if isinstance(task, JsonlTaskConfig):
            task.train = None if task.train is None else _resolve(task.train, base)
            task.test = _resolve(task.test, base)
        elif isinstance(task, HfTaskConfig) and task.data_files is not None:
            files = task.data_files
            if isinstance(files, dict):
                task.data_files = {k: [_resolve(f, base) for f in v] if isinstance(v, list) else _resolve(v, base)
                                   for k, v in files.items()}
            elif isinstance(files, list):
                task.data_files = [_resolve(f, base) for f in files]
            else:
                task.data_files = _resolve(files, base)
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def with_evaluation_overrides(config: RunConfig, overrides: list[str], command: str) -> RunConfig:
    """A finished run's config with `--set evaluation.*` applied (`command` names the command in errors): the
    other sections made the run, so an override of them is refused."""
    if not overrides:
        return config
    others = [key for key in override_keys(overrides) if not key.startswith("evaluation.")]
    if others:
        raise ConfigError(command, [f"--set {key}: only evaluation.* settings can change for a finished run"
                                    for key in others], kind="options")
    return validate_config(apply_overrides(config_to_dict(config), overrides), f"{command} --set")

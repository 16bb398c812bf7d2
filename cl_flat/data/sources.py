"""Task sources -> `TaskData` (instruction, label options, train/test examples).

- `builtin`: generated deterministically from the run seed (cl_flat.data.builtin);
- `jsonl`: one JSON object per line: "output" and every field the prompt template names ("input",
  "premise", ...), each a string, and optionally "references": [...] (every acceptable answer, for the
  generation metrics); errors name file:line;
- `hf`: `datasets.load_dataset` (hub id on users' machines, or csv/json/parquet with
  `data_files` locally), with text/label fields and label names for integer labels; `{input}` is
  the `text_field` column, any other template field the column of that name (values read with str()).

An example carries `input` (builtin, jsonl "input", hf `text_field`; "" where the template does not use
it), `output`, and `fields`: the template's other example fields as (name, text) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cl_flat.config import (
    DEFAULT_TEMPLATE,
    BuiltinTaskConfig,
    HfTaskConfig,
    JsonlTaskConfig,
    RunConfig,
    TaskConfig,
    template_fields,
)
from cl_flat.errors import DataError
from cl_flat.files import json_lines
from cl_flat.seeding import derive_seed


@dataclass(frozen=True)
class Example:
    input: str
    output: str  # the training target
    fields: tuple[tuple[str, str], ...] = ()  # the template's example fields other than input, in its order
    # every acceptable answer (SuperNI's test outputs); the generation metrics take the best; None: (output,)
    references: tuple[str, ...] | None = None

    @property
    def answers(self) -> tuple[str, ...]:
        """What a generation is compared with: the references, else the output alone."""
        return self.references if self.references is not None else (self.output,)


@dataclass(frozen=True)
class TaskData:
    name: str
    instruction: str
    labels: tuple[str, ...] | None
    metric: str
    template: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    chat_system: str | None = None
    chat: bool = False  # prompt_format: chat (cl_flat.data.batches.render_prompt)

    def prompt(self, example: Example) -> str:
        """The template filled: {instruction}, {options} (the labels, comma-separated) from the task,
        {input} and the other fields from the example."""
        options = ", ".join(self.labels) if self.labels else ""
        return self.template.format(**dict(example.fields), instruction=self.instruction, options=options,
                                    input=example.input)


def _check_labels(examples: list[Example], labels: list[str] | None, where: list[str]) -> None:
    if labels is None:
        return
    allowed = set(labels)
    for example, place in zip(examples, where):
        if example.output not in allowed:
            raise DataError(f"{place}: output {example.output!r} is not one of the task's labels {labels}")


def require_file(path: Path) -> None:
    """A DataError unless `path` is a regular file: what it is instead."""
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "file not found"
        raise DataError(f"{path}: {kind}")


def _encodable(text: str) -> bool:
    """False for a lone surrogate (JSON's "\\ud800"): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _references(row: dict, place: str, key: str = "references") -> tuple[str, ...] | None:
    """A row's optional references (field `key`): a non-empty list of strings, or None where the key is absent."""
    if key not in row:
        return None
    value = row[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{place}: \"{key}\" must be a non-empty list of strings (every acceptable "
                        f"answer), got {json.dumps(value)[:80]}")
    return tuple(value)


def read_jsonl(path: Path, labels: list[str] | None = None, template: str = DEFAULT_TEMPLATE) -> list[Example]:
    """The examples of a jsonl file: per line an object with a string "output" and a string for every
    example field `template` names."""
    require_file(path)
    names = template_fields(template)
    examples: list[Example] = []
    where: list[str] = []
    for number, row in json_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        for name in ("output", *names):
            if name not in row:
                why = "the target" if name == "output" else "the prompt_template names it"
                raise DataError(f"{path}:{number}: no field \"{name}\" ({why}); fields: {sorted(row)}")
            if not isinstance(row[name], str):
                raise DataError(f"{path}:{number}: field \"{name}\" must be a string, got "
                                f"{type(row[name]).__name__}")
            if not _encodable(row[name]):
                raise DataError(f"{path}:{number}: a lone surrogate escape (e.g. \"\\ud800\") is not text "
                                f"(field \"{name}\")")
        references = _references(row, f"{path}:{number}")
        if not all(map(_encodable, references or ())):
            raise DataError(f"{path}:{number}: a lone surrogate escape (e.g. \"\\ud800\") is not text (references)")
        examples.append(_example(row, names, row.get("input", ""), row["output"], references))
        where.append(f"{path}:{number}")
    if not examples:
        raise DataError(f"{path}: no examples (expected one JSON object per line)")
    _check_labels(examples, labels, where)
    return examples


def _example(row: dict, names: tuple[str, ...], text: str, output: str,
             references: tuple[str, ...] | None = None) -> Example:
    """An example whose {input} is `text` and whose other template fields are `row`'s (as str)."""
    return Example(text if "input" in names else "", output,
                   tuple((name, str(row[name])) for name in names if name != "input"), references)


def hf_data_files(task: HfTaskConfig) -> list[str]:
    """Every name in an hf task's `data_files` (a name, a list, or a split -> name(s) mapping), in order."""
    given = task.data_files
    names: list[str] = []
    for value in (given.values() if isinstance(given, dict) else [] if given is None else [given]):
        names += value if isinstance(value, list) else [value]
    return names


def _hf_split(task: HfTaskConfig, split: str) -> list[Example]:
    import datasets

    for name in hf_data_files(task):
        if Path(name).is_dir():  # datasets would say only that it cannot find a data file
            raise DataError(f"tasks[{task.name}]: data_files {name}: is a directory (expected a file or a glob)")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(task.dataset, task.subset, data_files=task.data_files, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"tasks[{task.name}]: data file not found ({exc})") from None
    except Exception as exc:  # datasets raises many types for bad files/splits; report, don't trace
        raise DataError(f"tasks[{task.name}]: cannot load {task.dataset!r} split {split!r}: "
                        f"{type(exc).__name__}: {exc}") from None
    names = template_fields(task.prompt_template)
    columns = [task.label_field] + [task.text_field if name == "input" else name for name in names] \
        + ([task.references_field] if task.references_field else [])
    for field in columns:
        if field not in table.column_names:
            why = "label_field" if field == task.label_field else \
                "text_field, the template's {input}" if field == task.text_field and "input" in names else \
                "references_field" if field == task.references_field else "the prompt_template names it"
            raise DataError(f"tasks[{task.name}]: split {split!r} has no column {field!r} ({why}); "
                            f"columns: {table.column_names}")
    examples: list[Example] = []
    for number, row in enumerate(table, start=1):
        empty = [field for field in columns[1:] if row[field] is None]
        if empty:
            raise DataError(f"tasks[{task.name}]: {split} row {number}: column {empty[0]!r} is empty (null)")
        label = row[task.label_field]
        if isinstance(label, int) and not isinstance(label, bool):
            if task.labels is None or not 0 <= label < len(task.labels):
                raise DataError(f"tasks[{task.name}]: {split} row {number}: integer label {label} needs "
                                f"`labels:` with at least {label + 1} names")
            label = task.labels[label]
        references = _references(row, f"tasks[{task.name}]: {split} row {number}", task.references_field) \
            if task.references_field else None
        examples.append(_example(row, names, str(row[task.text_field]) if "input" in names else "", str(label),
                                 references))
    _check_labels(examples, task.labels, [f"tasks[{task.name}]: {split} row {n}" for n in range(1, len(examples) + 1)])
    return examples


def subsample(examples: Sequence[Example], cap: int | None, seed: int, *key: str) -> tuple[Example, ...]:
    """A fixed subset of `cap` examples (keyed by seed and `key`, order kept) when a cap is set."""
    if cap is None or len(examples) <= cap:
        return tuple(examples)
    import random

    keep = sorted(random.Random(derive_seed(seed, *key)).sample(range(len(examples)), cap))
    return tuple(examples[i] for i in keep)


def load_task(task: TaskConfig, seed: int, default_metric: str) -> TaskData:
    """Examples of one task, with its instruction and labels, ready for prompting. `seed` is the
    run seed (builtin data, the train subset); `default_metric` is evaluation.metric."""
    data = _load_task(task, seed, task.metric or default_metric)
    return replace(data, train=subsample(data.train, task.max_train_samples, seed, "train-subset", task.name))


def load_tasks(config: RunConfig) -> list[TaskData]:
    """Every task of the run, in order."""
    require_prepared(config.tasks)
    return [load_task(task, config.run.seed, config.evaluation.metric) for task in config.tasks]


def _local_name(dataset: str) -> bool:
    """A name that can only be a folder: a hub id is `name` or `owner/name`."""
    return dataset.startswith((".", "/", "~")) or dataset.count("/") >= 2


def _benchmarks() -> dict[str, tuple[tuple[str, ...], str]]:
    """Each benchmark `cl-flat data prepare` writes: its task names and what its --source takes."""
    from cl_flat.data.benchmarks import BENCHMARKS, SOURCE_HINT
    from cl_flat.data.superni import SOURCE_HINT as SUPERNI_HINT
    from cl_flat.data.superni import SUPERNI, SUPERNI_TASKS

    return {**{name: (members, SOURCE_HINT) for name, members in BENCHMARKS.items()},
            SUPERNI: (tuple(SUPERNI_TASKS), SUPERNI_HINT)}


def _missing_folder(task: TaskConfig) -> str | None:
    """The local folder an hf task names, or the folder of a jsonl task's files when it is a benchmark task's
    prepared folder (data/superni/<task>/), that is not there; None otherwise."""
    if isinstance(task, HfTaskConfig):
        missing = task.data_files is None and _local_name(task.dataset) and not Path(task.dataset).expanduser().exists()
        return task.dataset if missing else None
    folder = task.test.parent if isinstance(task, JsonlTaskConfig) else None
    if folder is not None and (task.train is None or task.train.parent == folder) \
            and not folder.expanduser().exists() \
            and any(folder.name in members for members, _ in _benchmarks().values()):
        return str(folder)
    return None


def _unprepared(tasks: Sequence[TaskConfig]) -> list[tuple[TaskConfig, str]]:
    return [(task, folder) for task in tasks if (folder := _missing_folder(task)) is not None]


def unprepared_message(tasks: Sequence[TaskConfig]) -> str | None:
    """What is wrong when tasks name local dataset folders that are not there, with the `cl-flat data prepare`
    command that writes them when they are a benchmark's tasks in one folder; None if none is."""
    missing = _unprepared(tasks)
    if not missing:
        return None
    folders = {str(Path(folder).parent) for _, folder in missing}
    names = [Path(folder).name for _, folder in missing]
    benchmark = next(((b, hint) for b, (members, hint) in _benchmarks().items() if set(names) <= set(members)), None)
    what = "dataset folder not found: " + ", ".join(f"tasks[{task.name}] {folder}" for task, folder in missing)
    if benchmark is None or len(folders) != 1:
        return what
    return (f"{what}; prepare them first: cl-flat data prepare {benchmark[0]} --out {folders.pop()} --source "
            f"{benchmark[1]}; see docs/benchmarks.md")


def require_prepared(tasks: Sequence[TaskConfig]) -> None:
    message = unprepared_message(tasks)
    if message:
        raise DataError(message)


def _load_task(task: TaskConfig, seed: int, metric: str) -> TaskData:
    if isinstance(task, BuiltinTaskConfig):
        from cl_flat.data.builtin import BUILTIN_TASKS, builtin_examples

        key = task.task or task.name
        if key not in BUILTIN_TASKS:
            raise DataError(f"tasks[{task.name}]: unknown builtin task {key!r}; available: {list(BUILTIN_TASKS)}")
        spec = BUILTIN_TASKS[key]
        train = builtin_examples(key, "train", task.n_train, seed)
        test = builtin_examples(key, "test", task.n_test, seed)
        return TaskData(task.name, task.instruction or spec.instruction, tuple(spec.labels), metric,
                        task.prompt_template,
                        tuple(Example(r["input"], r["output"]) for r in train),
                        tuple(Example(r["input"], r["output"]) for r in test), task.chat_system,
                        task.prompt_format == "chat")
    if isinstance(task, JsonlTaskConfig):
        train = [] if task.train is None else read_jsonl(task.train, task.labels, task.prompt_template)
        test = read_jsonl(task.test, task.labels, task.prompt_template)
    else:
        train, test = _hf_split(task, task.train_split), _hf_split(task, task.test_split)
    labels = tuple(task.labels) if task.labels else None
    instruction = task.instruction or (f"Classify the input as one of: {', '.join(labels)}." if labels
                                       else "Answer the input.")
    return TaskData(task.name, instruction, labels, metric, task.prompt_template, tuple(train), tuple(test),
                    task.chat_system, task.prompt_format == "chat")


def check_local_data(config: RunConfig) -> list[str]:
    """Load every task whose data is local (builtin, jsonl, hf with data_files); return notes
    for tasks that would need a download (never attempted here)."""
    unprepared = unprepared_message(config.tasks)
    notes = [unprepared] if unprepared else []
    skipped = {task.name for task, _ in _unprepared(config.tasks)}
    for task in config.tasks:
        if task.name in skipped:
            continue
        if isinstance(task, HfTaskConfig) and task.data_files is None and not Path(task.dataset).exists():
            notes.append(f"tasks[{task.name}]: hub dataset {task.dataset!r} is not checked (no download)")
            continue
        load_task(task, config.run.seed, config.evaluation.metric)
    return notes

"""`cl-flat data prepare BENCHMARK --out DIR [--source hub|PATH] [--tasks a,b]`: O-LoRA's benchmarks as jsonl.

Writes `DIR/<task>/train.jsonl` and `DIR/<task>/test.jsonl` (one `{"input": ..., "output": ...}` per
line: `input` is the task's CL_Benchmark sentence, `output` its label name) for every task of the
benchmark (cl_flat.data.benchmarks: `standard` = DBpedia, Amazon, Yahoo, AG News; `long` = the 15
tasks), or only the `--tasks` named (a partial copy of CL_Benchmark: a selected task whose folder is
missing is one error naming the folder, before anything is written), and `DIR/prepared.json` last:
benchmark, the tasks prepared, source, seed, the sampling rule, and per task its
labels, instruction, prompt template, examples per split and per label, the source rows dropped,
and the sha256 of every file written. The shipped configs read DIR = `data/olora`.

Sources:
- `PATH`: a local copy of O-LoRA's `CL_Benchmark/` folder, its own format:
  `<category>/<dataset>/{train,test}.json` a JSON array of `{"sentence": ..., "label": ...}`, and
  `labels.json` the label names (which must be the task's, in its order). A missing or malformed file
  stops with one message naming file:line (DataError, exit 2).
- `hub`: the Hugging Face hub through `datasets` (a download on the user's machine), each row rendered
  as that task's CL_Benchmark sentence (benchmarks.HubSource).

Sampling (the published setup, sizes and their sources in cl_flat.data.benchmarks): a training split
of at most the published size (O-LoRA's own files) is kept whole; a larger one gives
`TRAIN_PER_CLASS` = 1000 examples of every label (all of a label that has fewer). A test split of at
most the published size (7600, or the whole validation set of the small tasks) is kept whole; a larger
one gives that many examples drawn uniformly. Draws use `random.Random(derive_seed(seed, "prepare",
task, split))`, so a task is the same sample in either benchmark, and rows keep their source order.
Rows whose label is not one of the task's (O-LoRA's MNLI test file has 131 with label "-", no gold
label) are dropped and counted in the manifest. Same source + same seed: byte-identical output.

Atomic: everything is written into a hidden `.DIR.*.partial` folder next to DIR, which is renamed to
DIR only once complete (`--overwrite` swaps out an existing DIR after that point), so an interrupted
preparation never leaves a folder that looks complete; a killed one may leave the hidden folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cl_flat.data.benchmarks import BENCHMARKS, TASKS, TRAIN_PER_CLASS, TaskSpec, benchmark_tasks
from cl_flat.errors import ConfigError, DataError
from cl_flat.seeding import derive_seed

MANIFEST = "prepared.json"
MANIFEST_FORMAT = 1
SPLITS = ("train", "test")


@dataclass
class Rows:
    """One split of one task as read from its source: (sentence, label) pairs in source order."""

    pairs: list[tuple[str, str]]
    dropped: Counter = field(default_factory=Counter)  # label -> rows dropped (not one of the task's labels)
    origin: str = ""


# ---------------------------------------------------------------- O-LoRA's CL_Benchmark files


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found (O-LoRA's layout: CL_Benchmark/<category>/<dataset>/"
                        "{train,test,labels}.json)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json_array(path: Path) -> list[tuple[object, int]]:
    """The elements of a JSON array file, each with the line it starts on; errors name file:line."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{_line_col(text, pos)[0]}: expected a JSON array of rows")
    items: list[tuple[object, int]] = []
    line, counted = 1, 0  # the line of offset `counted`, advanced as the rows are read
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        line, counted = line + text.count("\n", counted, pos), pos
        items.append((value, line))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            where = ":".join(map(str, _line_col(text, pos)))
            raise DataError(f"{path}:{where}: not valid JSON (expected ',' or ']' after row {len(items)})")
    rest = _skip_space(text, pos + 1)
    if rest != len(text):
        raise DataError(f"{path}:{_line_col(text, rest)[0]}: text after the JSON array")
    return items


def read_cl_benchmark(root: Path, task: TaskSpec, split: str) -> Rows:
    """One split of a task from O-LoRA's CL_Benchmark folder, checked against the task's labels."""
    folder = root / task.category / task.dataset
    labels_path = folder / "labels.json"
    text = _read_text(labels_path)
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{labels_path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    if labels != list(task.labels):
        raise DataError(f"{labels_path}:1: labels {labels} are not task {task.name!r}'s {list(task.labels)}")
    path = folder / f"{split}.json"
    rows = Rows([], origin=str(Path(task.category) / task.dataset / f"{split}.json"))
    allowed = set(task.labels)
    for number, (row, line) in enumerate(read_json_array(path), start=1):
        if not isinstance(row, dict) or not isinstance(row.get("sentence"), str) \
                or not isinstance(row.get("label"), str):
            raise DataError(f"{path}:{line}: row {number}: expected an object with string fields "
                            "\"sentence\" and \"label\"")
        if row["label"] in allowed:
            rows.pairs.append((row["sentence"], row["label"]))
        else:
            rows.dropped[row["label"]] += 1
    if not rows.pairs:
        raise DataError(f"{path}: no rows with one of the labels {list(task.labels)}")
    return rows


# ---------------------------------------------------------------- the Hugging Face hub


def load_hub_split(dataset: str, config: str | None, split: str):
    """`datasets.load_dataset(dataset, config, split=split)`: a download on first use."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(dataset, config, split=split)


def read_hub(task: TaskSpec, split: str, sample) -> Rows:
    """One split of a task from the hub: labels mapped to names, `sample(labels)` picks the row
    indices to keep, only those rows are rendered."""
    hub = task.hub
    name = f"{hub.dataset}" + (f" ({hub.config})" if hub.config else "")
    split_name = hub.train_split if split == "train" else hub.test_split
    where = f"hub dataset {name} split {split_name!r}"
    try:
        table = load_hub_split(hub.dataset, hub.config, split_name)
    except Exception as exc:  # datasets raises many types (missing, offline, gated): report, don't trace
        raise DataError(f"{where}: cannot load ({type(exc).__name__}: {exc})") from None
    if hub.label_column not in table.column_names:
        raise DataError(f"{where}: no column {hub.label_column!r}; columns: {table.column_names}")
    rows = Rows([], origin=f"{where}")
    kept: list[tuple[int, str]] = []
    for index, raw in enumerate(table[hub.label_column]):
        label = hub.label(raw)
        if label is None:
            rows.dropped[str(raw)] += 1
        else:
            kept.append((index, label))
    chosen = sample([label for _, label in kept])
    picked = [kept[i] for i in chosen]
    for (index, label), row in zip(picked, table.select([index for index, _ in picked])):
        try:
            sentence = hub.render(row)
        except KeyError as exc:
            raise DataError(f"{where}: row {index + 1} has no column {exc}; columns: {table.column_names}") from None
        rows.pairs.append((sentence, label))
    if not rows.pairs:
        raise DataError(f"{where}: no rows with one of the labels {list(task.labels)}")
    return rows


# ---------------------------------------------------------------- sampling


def sample_indices(labels: list[str], task: TaskSpec, split: str, seed: int) -> list[int]:
    """The rows of a split kept by the published rule (module docstring), in source order."""
    limit = task.train_size if split == "train" else task.test_size
    if len(labels) <= limit:
        return list(range(len(labels)))
    rng = random.Random(derive_seed(seed, "prepare", task.name, split))
    if split == "test":
        return sorted(rng.sample(range(len(labels)), limit))
    by_label: dict[str, list[int]] = {label: [] for label in task.labels}
    for index, label in enumerate(labels):
        by_label[label].append(index)
    chosen: list[int] = []
    for label in task.labels:
        group = by_label[label]
        chosen += rng.sample(group, min(TRAIN_PER_CLASS, len(group)))
    return sorted(chosen)


def _read_split(task: TaskSpec, split: str, source: str, seed: int) -> Rows:
    if source == "hub":
        return read_hub(task, split, lambda labels: sample_indices(labels, task, split, seed))
    rows = read_cl_benchmark(Path(source), task, split)
    keep = sample_indices([label for _, label in rows.pairs], task, split, seed)
    rows.pairs = [rows.pairs[i] for i in keep]
    return rows


# ---------------------------------------------------------------- writing


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> str:
    """Write the pairs as jsonl (fsynced); return the sha256 of the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for sentence, label in pairs:
            line = (json.dumps({"input": sentence, "output": label}, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(line)
            handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _task_entry(task: TaskSpec, splits: dict[str, tuple[Rows, str]]) -> dict:
    entry = {"labels": list(task.labels), "instruction": task.instruction, "prompt_template": task.prompt_template,
             "published": {"train": task.train_size, "test": task.test_size}, "splits": {}}
    for split, (rows, digest) in splits.items():
        counts = Counter(label for _, label in rows.pairs)
        entry["splits"][split] = {
            "file": f"{task.name}/{split}.jsonl", "sha256": digest, "examples": len(rows.pairs),
            "per_label": {label: counts[label] for label in task.labels}, "origin": rows.origin,
            "dropped": dict(sorted(rows.dropped.items())),
        }
    return entry


def _check_options(benchmark: str, out: Path, source: str, overwrite: bool, tasks: Sequence[str] | None) -> None:
    problems = []
    if benchmark not in BENCHMARKS:
        problems.append(f"BENCHMARK: unknown benchmark {benchmark!r}; available: {sorted(BENCHMARKS)}")
    elif tasks is not None:
        unknown = [name for name in tasks if name not in BENCHMARKS[benchmark]]
        if unknown or not tasks:
            problems.append(f"--tasks: {', '.join(unknown) or 'no task named'}: not a task of the {benchmark} "
                            f"benchmark; its tasks: {', '.join(BENCHMARKS[benchmark])}")
    if source != "hub" and not Path(source).is_dir():
        problems.append(f"--source: {source} is not a folder (give 'hub' or the path of O-LoRA's CL_Benchmark/)")
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} exists and is not a folder")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        problems.append(f"--out: {out} exists and is not empty; pass --overwrite to replace it")
    if problems:
        raise ConfigError("cl-flat data prepare", problems, kind="options")


def _install(tmp: Path, out: Path) -> None:
    """Move the complete `tmp` folder to `out`, replacing an existing `out` only now."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_folders(source: str, selected: list[TaskSpec], all_tasks: bool) -> None:
    """One DataError naming every selected task's missing CL_Benchmark/<category>/<dataset>/ folder."""
    missing = [task for task in selected if not (Path(source) / task.category / task.dataset).is_dir()]
    if missing:
        present = [task.name for task in selected if task not in missing]
        hint = (f"; prepare the tasks this copy has with --tasks {','.join(present)}" if all_tasks and present
                else "")
        raise DataError("; ".join(f"{Path(source) / t.category / t.dataset}: no such folder (task {t.name})"
                                  for t in missing) + hint)


def size_against_published(task: str, split: str, count: int) -> str:
    """How a prepared split's size compares with the paper's (`TaskSpec.train_size`/`test_size`): "" when
    equal, else a note, a warning when smaller (a partial copy of the data: scores will not compare)."""
    spec = TASKS[task]
    published = spec.train_size if split == "train" else spec.test_size
    if count == published:
        return ""
    if count < published:
        return f"; warning: the paper used {published}, {published - count} fewer here (a partial source?)"
    return f"; the paper used {published}"


def prepare_benchmark(benchmark: str, out: str | Path, source: str = "hub", seed: int = 42,
                      overwrite: bool = False, progress=None, tasks: Sequence[str] | None = None) -> dict:
    """Prepare `benchmark` (its `tasks` only, in the benchmark's order, when given) from `source` ('hub' or a
    CL_Benchmark folder) into `out`; return the manifest. `progress(task, split, rows)` is called after each
    split is written."""
    out = Path(out)
    source = source if source == "hub" else str(Path(source).resolve())
    _check_options(benchmark, out, source, overwrite, tasks)
    selected = [task for task in benchmark_tasks(benchmark) if tasks is None or task.name in tasks]
    if source != "hub":
        _check_folders(source, selected, tasks is None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        entries = {}
        for task in selected:
            splits = {}
            for split in SPLITS:
                rows = _read_split(task, split, source, seed)
                splits[split] = (rows, _write_jsonl(tmp / task.name / f"{split}.jsonl", rows.pairs))
                if progress is not None:
                    progress(task.name, split, rows)
            entries[task.name] = _task_entry(task, splits)
        manifest = {
            "format": MANIFEST_FORMAT, "benchmark": benchmark,
            "prepared_tasks": [task.name for task in selected],  # all of the benchmark's, or --tasks
            "source": {"kind": "hub"} if source == "hub" else {"kind": "cl_benchmark", "path": source},
            "seed": seed,
            "sampling": {"train_per_class": TRAIN_PER_CLASS, "rule": "a split of at most the published size is "
                         "kept whole; a larger train split gives train_per_class per label, a larger test split "
                         "the published size drawn uniformly; source order kept"},
            "tasks": entries,
            "files": {e["file"]: e["sha256"] for t in entries.values() for e in t["splits"].values()},
        }
        _write_manifest(tmp / MANIFEST, manifest)  # last: its presence marks a complete preparation
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

"""`cl-flat data prepare BENCHMARK --out DIR [--source hub|PATH] [--tasks a,b]`: O-LoRA's benchmarks, and SAPT's
SuperNI sequence (`superni`, from a local copy only: cl_flat.data.superni), as jsonl.

SuperNI: `DIR/<task>/{train,test}.jsonl` hold every instance of SAPT's `<task>/{train,test}.json`, in file
order, as `{"input": ..., "output": <first reference>, "references": [every reference]}`; the manifest records
per task its instruction (the Definition), prompt template, sizes against the published ones, the instances
with more than one reference, and whether dev.json is test.json. The O-LoRA benchmarks:

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
from cl_flat.data.superni import (
    PROMPT_TEMPLATE,
    SUPERNI,
    SUPERNI_ORDERS,
    SUPERNI_TASKS,
    dev_is_test,
    read_superni,
    superni_root,
)
from cl_flat.errors import ConfigError, DataError
from cl_flat.files import json_array, line_col, skip_space
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
    items, end = json_array(path, text)
    rest = skip_space(text, end)
    if rest != len(text):
        raise DataError(f"{path}:{line_col(text, rest)[0]}: text after the JSON array")
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


def _write_jsonl(path: Path, pairs: list[tuple[str, str]], references: list[list[str]] | None = None) -> str:
    """Write the pairs as jsonl (fsynced), each row with its `references` when given; return the sha256 of the
    bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for index, (sentence, label) in enumerate(pairs):
            row = {"input": sentence, "output": label}
            if references is not None:
                row["references"] = references[index]
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
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
    members = SUPERNI_ORDERS[1] if benchmark == SUPERNI else BENCHMARKS.get(benchmark)
    if members is None:
        problems.append(f"BENCHMARK: unknown benchmark {benchmark!r}; available: {sorted([*BENCHMARKS, SUPERNI])}")
    elif tasks is not None:
        unknown = [name for name in tasks if name not in members]
        if unknown or not tasks:
            problems.append(f"--tasks: {', '.join(unknown) or 'no task named'}: not a task of the {benchmark} "
                            f"benchmark; its tasks: {', '.join(members)}")
    if benchmark == SUPERNI and source == "hub":
        problems.append("--source: hub: no hub dataset holds SAPT's SuperNI samples (the authors' own draw from "
                        "Super-NaturalInstructions); pass the path of a local copy of SAPT's CL_Benchmark/SuperNI "
                        "folder (github.com/circle-hit/SAPT)")
    elif source != "hub" and not Path(source).is_dir():
        wanted = "SAPT's CL_Benchmark/SuperNI/" if benchmark == SUPERNI else "O-LoRA's CL_Benchmark/ (or 'hub')"
        problems.append(f"--source: {source} is not a folder (give the path of {wanted})")
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


def _check_folders(folders: list[tuple[str, Path]], all_tasks: bool) -> None:
    """One DataError naming every selected task's missing source folder (`folders`: (task, its folder))."""
    missing = [(name, folder) for name, folder in folders if not folder.is_dir()]
    if missing:
        present = [name for name, folder in folders if folder.is_dir()]
        hint = (f"; prepare the tasks this copy has with --tasks {','.join(present)}" if all_tasks and present
                else "")
        raise DataError("; ".join(f"{folder}: no such folder (task {name})" for name, folder in missing) + hint)


def size_against_published(task: str, split: str, count: int) -> str:
    """How a prepared split's size compares with the paper's (`TaskSpec.train_size`/`test_size`): "" when
    equal, else a note, a warning when smaller (a partial copy of the data: scores will not compare)."""
    spec = TASKS.get(task) or SUPERNI_TASKS[task]
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
    if benchmark == SUPERNI:
        names = [name for name in SUPERNI_ORDERS[1] if tasks is None or name in tasks]
        root = superni_root(Path(source))
        _check_folders([(name, root / name) for name in names], tasks is None)
        return _atomically(out, lambda tmp: _write_superni(tmp, root, names, progress))
    selected = [task for task in benchmark_tasks(benchmark) if tasks is None or task.name in tasks]
    if source != "hub":
        _check_folders([(t.name, Path(source) / t.category / t.dataset) for t in selected], tasks is None)
    return _atomically(out, lambda tmp: _write_olora(tmp, benchmark, selected, source, seed, progress))


def _write_olora(tmp: Path, benchmark: str, selected: list[TaskSpec], source: str, seed: int, progress) -> dict:
    """O-LoRA's benchmark tasks `selected` as jsonl in `tmp`, sampled as published; the manifest."""
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
    return manifest


def _write_superni(tmp: Path, root: Path, names: list[str], progress) -> dict:
    """SAPT's SuperNI files of the tasks `names` as jsonl in `tmp` (every instance, in file order); the manifest."""
    entries = {}
    for name in names:
        entry = {"instruction": None, "prompt_template": PROMPT_TEMPLATE, "dev_is_test": dev_is_test(root, name),
                 "published": {"train": SUPERNI_TASKS[name].train_size, "test": SUPERNI_TASKS[name].test_size},
                 "splits": {}}
        for split in SPLITS:
            read = read_superni(root, name, split)
            if entry["instruction"] not in (None, read.instruction):
                raise DataError(f"{root / name / 'test.json'}: its Definition differs from train.json's")
            entry["instruction"] = read.instruction
            rows = Rows([(text, refs[0]) for text, refs in read.examples], origin=read.origin)
            references = [refs for _, refs in read.examples]
            digest = _write_jsonl(tmp / name / f"{split}.jsonl", rows.pairs, references)
            entry["splits"][split] = {"file": f"{name}/{split}.jsonl", "sha256": digest, "examples": len(rows.pairs),
                                      "multi_reference": sum(len(refs) > 1 for refs in references),
                                      "origin": read.origin}
            if progress is not None:
                progress(name, split, rows)
        entries[name] = entry
    return {"format": MANIFEST_FORMAT, "benchmark": SUPERNI, "prepared_tasks": names,
            "source": {"kind": "sapt_superni", "path": str(root)},
            "sampling": {"rule": "SAPT's files kept whole, in file order: output = the first reference, "
                         "references = all of them"},
            "tasks": entries, "files": {e["file"]: e["sha256"] for t in entries.values() for e in t["splits"].values()}}


def _atomically(out: Path, write) -> dict:
    """`write(tmp)` into a hidden folder beside `out`, then its manifest, then the folder renamed to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = write(tmp)
        _write_manifest(tmp / MANIFEST, manifest)  # last: its presence marks a complete preparation
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

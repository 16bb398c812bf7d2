"""RunDir: where each file of a run's results folder lives (docs/results.md), its atomic writes,
and the readers of what a run saved.

    config.yaml        resolved config + "meta" (world size, global batch, LoRA targets adapted, versions, git commit)
    acc_matrix.csv     zero_shot row, then one row per trained task (rewritten after every task)
    probe_matrix.csv   `probes:` only: the probes' scores, rows as acc_matrix.csv's (written just before it)
    sharpness_matrix.csv  evaluation.sharpness_every_task: after_task,task,space + SHARPNESS_COLUMNS, one
                       row per (trained task t, task i <= t), from landscape/sharpness.json (rewritten after every task)
    metrics.json       written last: its presence marks a complete run
    train_log.jsonl    one line per update
    adapters/<task>/   the peft adapter each task trained
    checkpoints/<task>/  the in-flight task's newest in-task checkpoint (removed once its row is written)
    landscape/         <stem>_1d.csv, <stem>_2d.csv, sharpness.json ({stem: {"avg", "worst", "rho", "samples",
                       "lambda_max", "trace", "trace_se", "hessian_iters", "hessian_probes", ...}}; stems:
                       cl_flat.landscape.landscape_stem)
    eval/              <name>.csv, <name>.json: `cl-flat eval` re-scores (never acc_matrix.csv)
    plots/             PNGs drawn from the files above
    logs/rank<k>.log   everything process k printed (stdout and stderr), every attempt appended
    wandb/             the wandb run's local files (logging.wandb.mode online or offline)
Only rank 0 writes (but each rank its logs/rank<k>.log); every write is atomic (temp file, then rename).
Resuming a folder: `rundir.resume`; the checks before a command reads a saved run: `rundir.checks`.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig, config_to_dict, validate_config
from cl_flat.config.yamlfile import YamlProblem, read_yaml
from cl_flat.errors import ConfigError, DataError, UserError
from cl_flat.files import atomic_write_text
from cl_flat.matrix_csv import read_acc_matrix, read_probe_matrix, write_acc_matrix
from cl_flat.metrics import ZERO_SHOT, Rows
from cl_flat.rundir.lock import NAME as LOCK_NAME
from cl_flat.strategies import build_strategies

SHARPNESS_COLUMNS = ("avg", "worst", "lambda_max", "trace", "trace_se")  # the measures of sharpness_matrix.csv


class RunDir:
    RESULTS_FORMAT = 1
    """Major version of this folder layout, saved as meta.results_format. A config.yaml without it (written
    before the field existed, or by hand) is read as format 1: that is its layout."""
    ADAPTER_WEIGHTS = "adapter_model.safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, config: RunConfig) -> RunDir:
        return cls(config.run.output_dir / config.run.name)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def matrix_path(self) -> Path:
        return self.path / "acc_matrix.csv"

    @property
    def probe_matrix_path(self) -> Path:
        return self.path / "probe_matrix.csv"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def sharpness_path(self) -> Path:
        return self.path / "landscape" / "sharpness.json"

    @property
    def sharpness_matrix_path(self) -> Path:
        return self.path / "sharpness_matrix.csv"

    @property
    def reference_path(self) -> Path:
        return self.path / "reference.csv"

    def adapter_dir(self, task: str) -> Path:
        return self.path / "adapters" / task

    def checkpoint_dir(self, task: str) -> Path:
        return self.path / "checkpoints" / task

    def landscape_csv(self, stem: str, dims: int) -> Path:
        return self.path / "landscape" / f"{stem}_{dims}d.csv"

    def plot(self, name: str) -> Path:
        return self.path / "plots" / f"{name}.png"

    def rank_log(self, rank: int) -> Path:
        return self.path / "logs" / f"rank{rank}.log"

    def clear(self) -> None:
        """Remove everything the folder holds but its lock file (`--overwrite`, under that lock)."""
        for entry in self.path.iterdir() if self.path.is_dir() else []:
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ------------------------------------------------------------ config.yaml

    def save_config(self, config: RunConfig, meta: dict[str, Any]) -> None:
        document = config_to_dict(config) | {"meta": meta}
        atomic_write_text(self.config_path, yaml.safe_dump(document, sort_keys=False))

    def read_document(self) -> Any:
        """config.yaml as saved (the config's keys and "meta"): the one reader of the file. A missing folder
        or file, or text that is not YAML, is a ConfigError naming it (file:line)."""
        if not self.path.is_dir():
            self.refuse(f"{self.path}: {'not a folder' if self.path.exists() else 'run folder not found'}")
        if not self.config_path.is_file():
            self.refuse(f"{self.path}: not a cl-flat run folder ({self.config_path.name} is missing)")
        try:
            return read_yaml(self.config_path)
        except YamlProblem as exc:
            self.refuse(str(exc))

    def refuse(self, *problems: str, kind: str = "run folder") -> None:
        """Raise a ConfigError (exit 2) about this folder listing `problems`, if there are any."""
        if problems:
            raise ConfigError(str(self.path), list(problems), kind=kind)

    def config_of(self, document: Any) -> RunConfig:
        """The run's config in `document` (read by `read_document`), validated."""
        raw = dict(document) if isinstance(document, dict) else document
        if isinstance(raw, dict):
            raw.pop("meta", None)
        return validate_config(raw, str(self.config_path))

    def load_config(self) -> RunConfig:
        return self.config_of(self.read_document())

    def stored_meta(self) -> dict[str, Any]:
        """The "meta" block of the stored config.yaml (empty if there is none)."""
        if not self.config_path.is_file():
            return {}
        return meta_of(self.read_document())

    # ------------------------------------------------------------ accuracy matrix and metrics

    def write_matrix(self, names: list[str], rows: Rows, probes: list[str] | None = None,
                     probe_rows: Rows | None = None) -> None:
        """acc_matrix.csv and, with probes, probe_matrix.csv: that one first, so that acc_matrix.csv (what
        --resume reads) never holds a row that probe_matrix.csv lacks; a kill in between leaves it a row
        ahead, dropped on resume (`restored_probe_rows`)."""
        if probes:
            write_acc_matrix(self.probe_matrix_path, probes, probe_rows or [])
        write_acc_matrix(self.matrix_path, names, rows)

    def restored_probe_rows(self, probes: list[str], kept: list[str]) -> Rows:
        """The saved probe rows of the rows `kept` (after_task names, acc_matrix.csv's restored rows), one
        column per probe in `probes`; a score the file lacks (no file, a probe added by a config change)
        is None. A malformed file is a MatrixFormatError naming file:line."""
        saved: dict[str, dict[str, float | None]] = {}
        if probes and self.probe_matrix_path.is_file():
            names, rows = read_probe_matrix(self.probe_matrix_path)
            saved = {after: dict(zip(names, scores)) for after, scores in rows}
        return [(after, [saved.get(after, {}).get(p) for p in probes]) for after in kept] if probes else []

    def trained_tasks(self) -> list[str]:
        """Tasks whose training finished (their row is in acc_matrix.csv), in order."""
        if not self.matrix_path.is_file():
            return []
        names, rows, _ = read_acc_matrix(self.matrix_path, allow_partial=True)
        return names[:len(rows)]

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.metrics_path, json.dumps(metrics, indent=2) + "\n")

    # ------------------------------------------------------------ reference runs (--reference)

    def write_reference(self, kind: str, names: list[str], zero_shot: list[float], scores: list[float]) -> None:
        """reference.csv (rows zero_shot and `kind`: the score of each task) and metrics.json, written last."""
        write_acc_matrix(self.reference_path, names, [(ZERO_SHOT, zero_shot), (kind, scores)])
        self.write_metrics({"reference": kind, "tasks": names, "scores": scores,
                            "mean": sum(scores) / len(scores)})

    def read_reference(self, kind: str) -> tuple[list[str], list[float]]:
        """(tasks, scores) of a finished reference run of `kind`, or a ConfigError naming the folder."""
        problem = None
        if not self.metrics_path.is_file():
            problem = f"{self.path}: not a finished reference run ({self.metrics_path.name} is missing)"
        else:
            saved = json.loads(self.metrics_path.read_text())
            if saved.get("reference") != kind:
                problem = (f"{self.metrics_path}: a {saved.get('reference') or 'sequential'} run, not a "
                           f"{kind} reference (cl-flat train CONFIG --reference {kind})")
        if problem:
            raise ConfigError(str(self.path), [problem], kind="reference run")
        return saved["tasks"], saved["scores"]

    # ------------------------------------------------------------ the training log

    def logged_updates(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) of every update train_log.jsonl holds; a line a kill cut short is left out, any other
        line that is not an update's record is a DataError naming file:line."""
        if not self.log_path.exists():
            return []
        logged = []
        for number, line in enumerate(self.log_path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if not isinstance(record, dict) or not {"task_index", "step"} <= set(record):
                raise DataError(f"{self.log_path}:{number}: expected an update's record (an object with "
                                f"task_index and step), got {line[:60]!r}")
            logged.append((line, record))
        return logged

    # ------------------------------------------------------------ landscapes and sharpness

    def write_landscape(self, stem: str, coords: list[tuple[float, ...]], losses: list[float]) -> Path:
        """landscape/<stem>_<d>d.csv: columns alpha,loss (1-D) or alpha,beta,loss (2-D), one row per grid point."""
        dims = len(coords[0])
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("alpha", "loss") if dims == 1 else ("alpha", "beta", "loss"))
        writer.writerows([[repr(float(v)) for v in (*c, loss)] for c, loss in zip(coords, losses)])
        path = self.landscape_csv(stem, dims)
        atomic_write_text(path, buffer.getvalue())
        return path

    def merge_sharpness(self, key: str, record: dict[str, Any]) -> Path:
        """Set entry `key` of landscape/sharpness.json (other entries kept), atomically."""
        data: dict[str, Any] = {}
        if self.sharpness_path.is_file():
            try:
                data = json.loads(self.sharpness_path.read_text())
            except json.JSONDecodeError:
                data = {}
        data[key] = dict(record)
        atomic_write_text(self.sharpness_path, json.dumps(data, indent=2) + "\n")
        return self.sharpness_path

    def write_sharpness_matrix(self, cells: list[tuple[str, str, str]], space: str) -> Path:
        """sharpness_matrix.csv: one row per (after_task, task, sharpness.json key) of `cells`, in order, with
        columns after_task,task,space + SHARPNESS_COLUMNS from that entry; an empty cell where there is none."""
        saved = json.loads(self.sharpness_path.read_text()) if self.sharpness_path.is_file() else {}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("after_task", "task", "space", *SHARPNESS_COLUMNS))
        for after, task, key in cells:
            entry = saved.get(key, {})
            writer.writerow([after, task, space, *("" if entry.get(c) is None else repr(float(entry[c]))
                                                   for c in SHARPNESS_COLUMNS)])
        atomic_write_text(self.sharpness_matrix_path, buffer.getvalue())
        return self.sharpness_matrix_path

    def saved_sharpness(self, names: list[str]) -> dict[str, Any]:
        """The sharpness.json entries of tasks in `names` (stems `<task>` and `<task>_merged`)."""
        saved = json.loads(self.sharpness_path.read_text()) if self.sharpness_path.is_file() else {}
        return {key: value for key, value in saved.items() if key.split("_merged")[0] in names}

    # ------------------------------------------------------------ adapters

    def adapter_dirs(self, config: RunConfig, upto: str) -> list[tuple[str, Path]]:
        """(adapter name, folder) of the stack as it was right after task `upto` was trained, in
        load order, as the run's strategy saved them (`AdapterStrategy.saved_adapters`): every task's
        adapter up to `upto` (inclora), or the shared one saved after `upto` (seqlora)."""
        saved = build_strategies(config).saved_adapters([t.name for t in config.tasks], upto)
        return [(adapter, self.adapter_dir(task)) for adapter, task in saved]

    def load_stack(self, base: nn.Module, config: RunConfig, upto: str) -> AdapterStack:
        """The adapter stack right after task `upto` on `base` (loaded by `models.load_run_model`, in
        the run's precision): every adapter active and frozen; `add_task` may continue it."""
        dirs = self.adapter_dirs(config, upto)
        missing = [str(d) for _, d in dirs if not d.is_dir()]
        if missing:
            raise UserError(f"{self.path}: adapter folder(s) missing: {missing}")
        return AdapterStack.load(base, config.lora, dirs, seed=config.run.seed)


def meta_of(document: Any) -> dict[str, Any]:
    """The "meta" block of a config.yaml document (empty if it has none)."""
    meta = document.get("meta") if isinstance(document, dict) else None
    return meta if isinstance(meta, dict) else {}

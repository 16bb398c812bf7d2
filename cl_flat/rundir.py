"""RunDir: the results folder of one run (README, "Results of a run") and every operation on it.

    config.yaml        resolved config + "meta" (world size, global batch, LoRA targets adapted, versions, git commit)
    acc_matrix.csv     zero_shot row, then one row per trained task (rewritten after every task)
    metrics.json       written last: its presence marks a complete run
    train_log.jsonl    one line per update
    adapters/<task>/   the peft adapter each task trained
    checkpoints/<task>/  the in-flight task's newest in-task checkpoint (removed once its row is written)
    landscape/         <stem>_1d.csv, <stem>_2d.csv, sharpness.json
    plots/             PNGs drawn from the files above
    logs/rank<k>.log   everything process k printed (stdout and stderr), every attempt appended
    wandb/             the wandb run's local files (logging.wandb.mode online or offline)
Only rank 0 writes (but each rank its logs/rank<k>.log); every write is atomic (temp file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from cl_flat import __version__
from cl_flat.adapters import AdapterStack
from cl_flat.config import RunConfig, config_to_dict, validate_config
from cl_flat.errors import ConfigError, MatrixFormatError, UserError
from cl_flat.files import atomic_write_text, json_lines
from cl_flat.metrics import ZERO_SHOT, read_acc_matrix, write_acc_matrix
from cl_flat.overrides import dotted_keys
from cl_flat.strategies import build_strategies

Rows = list[tuple[str, list[float]]]


class RunDir:
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
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def sharpness_path(self) -> Path:
        return self.path / "landscape" / "sharpness.json"

    def adapter_dir(self, task: str) -> Path:
        return self.path / "adapters" / task

    def checkpoint_dir(self, task: str) -> Path:
        return self.path / "checkpoints" / task

    def landscape_csv(self, stem: str, dims: int) -> Path:
        return self.path / "landscape" / f"{stem}_{dims}d.csv"

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

    def plot(self, name: str) -> Path:
        return self.path / "plots" / f"{name}.png"

    def rank_log(self, rank: int) -> Path:
        return self.path / "logs" / f"rank{rank}.log"

    # ------------------------------------------------------------ config

    def save_config(self, config: RunConfig, meta: dict[str, Any]) -> None:
        document = config_to_dict(config) | {"meta": meta}
        atomic_write_text(self.config_path, yaml.safe_dump(document, sort_keys=False))

    def load_config(self) -> RunConfig:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: run folder not found")
        if not self.config_path.is_file():
            raise UserError(f"{self.path}: not a cl-flat run folder ({self.config_path.name} is missing)")
        raw = yaml.safe_load(self.config_path.read_text())
        raw.pop("meta", None)
        return validate_config(raw, str(self.config_path))

    # ------------------------------------------------------------ accuracy matrix and metrics

    def write_matrix(self, names: list[str], rows: Rows) -> None:
        write_acc_matrix(self.matrix_path, names, rows)

    def trained_tasks(self) -> list[str]:
        """Tasks whose training finished (their row is in acc_matrix.csv), in order."""
        if not self.matrix_path.is_file():
            return []
        names, rows, _ = read_acc_matrix(self.matrix_path, allow_partial=True)
        return names[:len(rows)]

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.metrics_path, json.dumps(metrics, indent=2) + "\n")

    # ------------------------------------------------------------ reference runs (--reference)

    @property
    def reference_path(self) -> Path:
        return self.path / "reference.csv"

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

    # ------------------------------------------------------------ starting and resuming

    def config_changes(self, config: RunConfig) -> list[str]:
        """Each field where `config` differs from the stored one: "key: stored → new"."""
        def shown(values: dict[str, Any], key: str) -> str:
            return repr(values[key]) if key in values else "(absent)"

        ours, theirs = dotted_keys(config_to_dict(config)), dotted_keys(config_to_dict(self.load_config()))
        return [f"{key}: {shown(theirs, key)} → {shown(ours, key)}" for key in sorted(set(ours) | set(theirs))
                if key not in ours or key not in theirs or ours[key] != theirs[key]]

    def completed_rows(self, config: RunConfig, resume: bool, allow_changes: bool = False) -> Rows:
        """The saved rows (zero_shot + completed tasks) to resume from, or an error if the folder
        is in use; empty for a fresh start. A resumed config must equal the stored one unless
        `allow_changes` (then the changes apply to the tasks still to train)."""
        if not resume:
            if self.metrics_path.exists():
                raise UserError(f"{self.path} already holds a complete run; choose another run.name "
                                "(--set run.name=...)")
            if self.matrix_path.exists():
                raise UserError(f"{self.path} holds a started run; continue it with --resume, or choose another "
                                "run.name")
            return []
        if self.metrics_path.exists():
            raise UserError(f"{self.path} is already complete; nothing to resume")
        if not self.matrix_path.exists():
            return []
        changes = self.config_changes(config)
        if changes and not allow_changes:
            raise UserError(f"--resume: the config differs from {self.config_path}:\n"
                            + "".join(f"  - {c}\n" for c in changes)
                            + "resume with the same config and overrides, or pass --allow-config-change to train "
                              "the remaining tasks with the new values (the in-flight task restarts)")
        names, rows, zero_shot = read_acc_matrix(self.matrix_path, allow_partial=True)
        if zero_shot is None:
            return []
        done = 0
        for name in names[:len(rows)]:
            if not (self.adapter_dir(name) / "adapter_model.safetensors").is_file():
                break
            done += 1
        return [(ZERO_SHOT, zero_shot)] + [(names[i], rows[i]) for i in range(done)]

    def stored_meta(self) -> dict[str, Any]:
        """The "meta" block of the stored config.yaml (empty if there is none)."""
        if not self.config_path.is_file():
            return {}
        return (yaml.safe_load(self.config_path.read_text()) or {}).get("meta") or {}

    def skipped_updates(self, names: list[str]) -> dict[str, int]:
        """Per task, the updates dropped as non-finite (`on_nonfinite: skip`), read from the log."""
        counts = dict.fromkeys(names, 0)
        if self.log_path.exists():
            for _, record in json_lines(self.log_path):
                if record.get("skipped") and record["task"] in counts:
                    counts[record["task"]] += 1
        return counts

    def truncate_log(self, done: int, updates: int = 0) -> None:
        """Keep the log lines of the first `done` tasks and of the next task's first `updates`
        updates (those its checkpoint holds), so the log reads as one uninterrupted run."""
        if self.log_path.exists():
            def kept(record: dict[str, Any]) -> bool:
                return record["task_index"] < done or (record["task_index"] == done and record["step"] <= updates)

            lines = []
            for line in self.log_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    continue
                if kept(record):
                    lines.append(line)
            atomic_write_text(self.log_path, "".join(line + "\n" for line in lines))

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

    # ------------------------------------------------------------ sharpness

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

    def saved_sharpness(self, names: list[str]) -> dict[str, Any]:
        """The sharpness.json entries of tasks in `names` (stems `<task>` and `<task>_merged`)."""
        saved = json.loads(self.sharpness_path.read_text()) if self.sharpness_path.is_file() else {}
        return {key: value for key, value in saved.items() if key.split("_merged")[0] in names}

    # ------------------------------------------------------------ checks before a command reads a saved run

    RESULTS_FORMAT = 1
    """Major version of this folder layout, saved as meta.results_format. A config.yaml without it (written
    before the field existed, or by hand) is read as format 1: that is its layout."""
    ADAPTER_WEIGHTS = "adapter_model.safetensors"

    def _refuse(self, *problems: str, kind: str = "run folder") -> None:
        if problems:
            raise ConfigError(str(self.path), list(problems), kind=kind)

    def require_run(self, *, complete: bool = True, tasks: dict[str, str | None] | None = None
                    ) -> tuple[RunConfig, list[str]]:
        """Check the folder before any model is loaded or file written: a cl-flat run folder of the results
        format this code reads, an acc_matrix.csv with a row per trained task (every task if `complete`),
        and `tasks` ({flag: name}) naming trained tasks. Returns the config and the trained tasks; raises
        ConfigError (exit 2) naming the file (file:line) or the flag."""
        if not self.path.is_dir():
            self._refuse(f"{self.path}: {'not a folder' if self.path.exists() else 'run folder not found'}")
        if not self.config_path.is_file():
            self._refuse(f"{self.path}: not a cl-flat run folder ({self.config_path.name} is missing)")
        try:
            raw = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            self._refuse(f"{self.config_path}{f':{mark.line + 1}' if mark else ''}: not readable YAML")
        meta = (raw.get("meta") if isinstance(raw, dict) else None) or {}
        found = meta.get("results_format", 1) if isinstance(meta, dict) else "unknown"
        if str(found).split(".")[0] != str(self.RESULTS_FORMAT):
            versions = meta.get("versions") if isinstance(meta, dict) else None
            written_by = versions.get("cl_flat", "?") if isinstance(versions, dict) else "?"
            self._refuse(f"{self.config_path}: results format {found} (written by cl-flat {written_by}); this "
                         f"cl-flat {__version__} reads format {self.RESULTS_FORMAT}: use the cl-flat version that "
                         "wrote it, or train the run again")
        config = self.load_config()
        names = [t.name for t in config.tasks]
        if not self.matrix_path.is_file():
            self._refuse(f"{self.matrix_path}: missing: no task was evaluated yet")
        try:
            columns, rows, _ = read_acc_matrix(self.matrix_path, allow_partial=not complete)
        except MatrixFormatError as exc:
            self._refuse(str(exc))
        if columns != names:
            self._refuse(f"{self.matrix_path}:1: tasks {columns} differ from {self.config_path.name}'s {names}")
        trained = names[:len(rows)]
        if not trained:
            self._refuse(f"{self.matrix_path}: no task trained yet")
        self._refuse(*(f"{flag} {name!r}: unknown task; the run's tasks are {names}" if name not in names
                       else f"{flag} {name!r}: not trained yet (trained: {trained})"
                       for flag, name in (tasks or {}).items() if name is not None and name not in trained),
                     kind="options for run")
        return config, trained

    def require_adapters(self, config: RunConfig, stacks: list[str]) -> None:
        """Check that the adapters of the stack after each task in `stacks` are saved (ConfigError, exit 2)."""
        folders = dict.fromkeys(folder for upto in stacks for _, folder in self.adapter_dirs(config, upto))
        self._refuse(*(f"{folder}: the adapter of task {folder.name!r} is missing ("
                       + (f"no {self.ADAPTER_WEIGHTS})" if folder.is_dir() else "no such folder)")
                       for folder in folders if not (folder / self.ADAPTER_WEIGHTS).is_file()))

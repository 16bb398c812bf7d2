"""RunDir: the results folder of one run (README, "Results of a run") and every operation on it.

    config.yaml        resolved config + "meta" (world size, global batch, versions, git commit)
    acc_matrix.csv     zero_shot row, then one row per trained task (rewritten after every task)
    metrics.json       written last: its presence marks a complete run
    train_log.jsonl    one line per update
    adapters/<task>/   the peft adapter each task trained
    landscape/         <stem>_1d.csv, <stem>_2d.csv, sharpness.json
    plots/             PNGs drawn from the files above
Only rank 0 writes; every write is atomic (temp file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from cl_flat.adapters import AdapterStack, adapter_name
from cl_flat.config import RunConfig, config_to_dict, validate_config
from cl_flat.errors import UserError
from cl_flat.files import atomic_write_text
from cl_flat.metrics import ZERO_SHOT, read_acc_matrix, write_acc_matrix

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

    # ------------------------------------------------------------ starting and resuming

    def completed_rows(self, config: RunConfig, resume: bool) -> Rows:
        """The saved rows (zero_shot + completed tasks) to resume from, or an error if the folder
        is in use; empty for a fresh start."""
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
        ours, theirs = config_to_dict(config), config_to_dict(self.load_config())
        if ours != theirs:
            changed = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise UserError(f"--resume: the config differs from the one in {self.path} (sections {changed}); "
                            "resume with the same config and overrides")
        names, rows, zero_shot = read_acc_matrix(self.matrix_path, allow_partial=True)
        if zero_shot is None:
            return []
        done = 0
        for name in names[:len(rows)]:
            if not (self.adapter_dir(name) / "adapter_model.safetensors").is_file():
                break
            done += 1
        return [(ZERO_SHOT, zero_shot)] + [(names[i], rows[i]) for i in range(done)]

    def truncate_log(self, done: int) -> None:
        """Drop log lines of tasks from index `done` on, so the log reads as one uninterrupted run."""
        if self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["task_index"] < done]
            atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------ adapters

    def adapter_dirs(self, config: RunConfig, upto: str) -> list[tuple[str, Path]]:
        """(adapter name, folder) of the stack as it was right after task `upto` was trained, in
        load order: every task's adapter up to `upto` (inclora), or the shared one saved after
        `upto` (seqlora)."""
        names = [t.name for t in config.tasks]
        if config.lora.strategy == "seqlora":
            return [(adapter_name("seqlora", upto), self.adapter_dir(upto))]
        return [(name, self.adapter_dir(name)) for name in names[:names.index(upto) + 1]]

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

"""Run logging: `train_log.jsonl` (one line per update) and wandb. Rank 0 only; the
tracker of other ranks does nothing. wandb `disabled` costs nothing; tests use `offline`.

A context manager: however the block ends, the jsonl file is closed and the wandb run finished
(marked failed when the block raised).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cl_flat.config import RunConfig, config_to_dict


class Tracker:
    def __init__(self, config: RunConfig, log_path: Path, active: bool):
        self.config = config
        self.active = active
        self.log_path = log_path
        self._handle = None
        self._wandb = None

    def __enter__(self) -> Tracker:
        if not self.active:
            return self
        self._handle = self.log_path.open("a", encoding="utf-8")
        section = self.config.logging.wandb
        if section.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=section.project, entity=section.entity, group=section.group,
                                     tags=section.tags, name=self.config.run.name, mode=section.mode,
                                     dir=str(self.log_path.parent), config=config_to_dict(self.config),
                                     reinit="finish_previous")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if exc_type is None else 1)
            self._wandb = None

    def log_update(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        # strict JSON: a non-finite value is written as null (the record names it under "nonfinite")
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._handle.write(json.dumps(clean, allow_nan=False) + "\n")
        self._handle.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def log_scores(self, after_task: str, task_names: list[str], scores: list[float]) -> None:
        if self._wandb is not None:
            self._wandb.log({f"eval/{after_task}/{name}": s for name, s in zip(task_names, scores)})

    def log_summary(self, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in metrics.items() if v is not None})

"""Run logging: `train_log.jsonl` (one line per update) and wandb, rank 0 only (the tracker of other ranks does
nothing). Every rank's console output into logs/rank<k>.log: cl_flat.rank_log.

wandb `disabled` costs nothing; tests use `offline`. `WANDB_MODE`, when set to online, offline or disabled,
overrides `logging.wandb.mode` (a node without network, a test). Under a wandb agent (`WANDB_SWEEP_ID` set) the
run is the agent's: wandb.init takes its id from `WANDB_RUN_ID` and its sweep parameters from the agent. An online
run whose server does not answer within `logging.wandb.init_timeout` seconds logs offline instead, with one
warning (upload it later with `wandb sync`).

wandb never holds the run: once started, a wandb call that fails is one warning and wandb is dropped for the rest
of the run; finishing waits at most FINISH_TIMEOUT seconds. A full disk is `DiskFull` (files.writing), wherever.

The Tracker is a context manager: however the block ends, the jsonl file is closed and the wandb run finished
(marked failed when the block raised).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from cl_flat.config import RunConfig, WandbSection, config_to_dict
from cl_flat.errors import DiskFull, UserError
from cl_flat.files import disk_full_error, writing
from cl_flat.metrics import Rows, online_performance
from cl_flat.overrides import dotted_keys

WANDB_MODES = ("online", "offline", "disabled")
OFFLINE_START = 5.0  # seconds an offline wandb.init takes at most, starting wandb's service (about 1 s idle)
FINISH_TIMEOUT = 60.0  # seconds wandb.finish may take (uploads, a slow disk) before the run goes on without it


WANDB_RUN_ID = "wandb_run_id"  # config.yaml meta: the wandb run a resumed run continues


def new_wandb_run_id() -> str:
    return secrets.token_hex(4)


def sweep_run_id() -> str | None:
    """The wandb run id a sweep agent started this process for (`WANDB_RUN_ID`), None outside a sweep."""
    if not os.environ.get("WANDB_SWEEP_ID"):
        return None
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        raise UserError("WANDB_SWEEP_ID is set but WANDB_RUN_ID is not: start sweep runs with `wandb agent`")
    return run_id


def wandb_mode(section: WandbSection) -> str:
    """`WANDB_MODE` when it names a mode, else `logging.wandb.mode`."""
    forced = os.environ.get("WANDB_MODE", "").strip().lower()
    return forced if forced in WANDB_MODES else section.mode


class Tracker:
    def __init__(self, config: RunConfig, log_path: Path, active: bool, meta: dict[str, Any] | None = None):
        self.config = config
        self.meta = meta or {}
        self.active = active
        self.log_path = log_path
        self._handle = None
        self._wandb = None

    def __enter__(self) -> Tracker:
        if not self.active:
            return self
        with writing(self.log_path):
            self._handle = self.log_path.open("a", encoding="utf-8")
        mode = wandb_mode(self.config.logging.wandb)
        if mode != "disabled":
            self._wandb = self._start_wandb(mode)
        return self

    def _start_wandb(self, mode: str):
        """wandb.init with the resolved config and meta as dotted keys (the names sweep parameters use)."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        section = self.config.logging.wandb
        # console "off": logs/rank<k>.log already holds the output, and wandb's capture of a console whose
        # log file cannot be written (a full disk) reports its own failure to that console, for ever
        options = dict(project=section.project, entity=section.entity, group=section.group, tags=section.tags,
                       name=self.config.run.name, dir=str(self.log_path.parent), reinit="finish_previous",
                       config=dotted_keys(config_to_dict(self.config) | {"meta": self.meta}),
                       settings=wandb.Settings(init_timeout=section.init_timeout, console="off"))
        if self.meta.get(WANDB_RUN_ID) and not sweep_run_id():  # an agent's run id is the agent's
            options |= {"id": self.meta[WANDB_RUN_ID], "resume": "allow"}
        try:
            with writing(self.log_path.parent / "wandb"):
                run = wandb.init(mode=mode, **_online_budget(options, mode, section.init_timeout))
        except DiskFull:
            raise
        except Exception as exc:  # no key, unreachable or slow server: the run must not wait for it
            if mode != "online":
                raise
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"warning: wandb: no online run ({reason}); logging offline under {self.log_path.parent / 'wandb'}"
                  " (upload it later with `wandb sync`)", file=sys.stderr, flush=True)
            with writing(self.log_path.parent / "wandb"):
                run = wandb.init(mode="offline", **options)
        _quiet_wandb_logging()
        run.define_metric("eval/*", step_metric="eval/after_task")
        return run

    def _to_wandb(self, call, *args) -> None:
        """`call(*args)` on the wandb run; a failure is one warning and no more wandb for this run."""
        if self._wandb is None:
            return
        try:
            call(*args)
        except Exception as exc:
            self._drop_wandb(exc)

    def _drop_wandb(self, exc: BaseException) -> None:
        why = "no space left on device" if disk_full_error(exc) else (str(exc).strip().splitlines() or
                                                                       [type(exc).__name__])[0]
        print(f"warning: wandb: {why}; the run goes on without wandb (its results files are kept as usual)",
              file=sys.stderr, flush=True)
        run, self._wandb = self._wandb, None
        _finish(run, 1, timeout=5)

    def __exit__(self, exc_type, exc, traceback) -> None:
        handle, self._handle = self._handle, None
        try:
            if handle is not None:
                with writing(self.log_path):
                    handle.close()  # closed even when its last flush finds the disk full
        except DiskFull:
            if exc_type is None:  # else the block's own error (this same full disk, mostly) is the one to report
                raise
        finally:
            if self._wandb is not None:
                run, self._wandb = self._wandb, None
                _finish(run, 0 if exc_type is None else 1, FINISH_TIMEOUT)

    def log_update(self, record: dict[str, Any]) -> None:
        """One update: a strict-JSON line of train_log.jsonl (a non-finite value is null there; the record names it
        under "nonfinite") and its numbers as wandb `train/<key>` (loss, lr, grad_norm, method statistics)."""
        if not self.active:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with writing(self.log_path):  # a line cut short by a full disk is dropped on --resume (truncate_log)
            self._handle.write(json.dumps(clean, allow_nan=False) + "\n")
            self._handle.flush()
        if self._wandb is not None:
            self._to_wandb(self._wandb.log, {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def log_row(self, names: list[str], rows: Rows, probes: list[str] | None = None,
                probe_rows: Rows | None = None) -> None:
        """The newest row of the accuracy matrix (`rows`: zero_shot first) as `eval/acc/<task>` at
        `eval/after_task` = t (0: zero-shot), and OP_t for t ≥ 1; with probes, the newest probe row as
        `eval/probe/<probe>`."""
        if self._wandb is None:
            return
        after, scores = rows[-1]
        values: dict[str, Any] = {"eval/after_task": len(rows) - 1}
        values |= {f"eval/acc/{name}": score for name, score in zip(names, scores)}
        if probes and probe_rows:
            values |= {f"eval/probe/{name}": score for name, score in zip(probes, probe_rows[-1][1])}
        t = len(rows) - 1
        if t:  # OP_t of the square matrix of the first t tasks after tasks 1..t
            values["eval/OP"] = online_performance([r[:t] for _, r in rows[1:]])[-1]
        self._to_wandb(self._wandb.log, values)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """Values of the whole run into the wandb summary; null ones are left out."""
        if self._wandb is not None:
            self._to_wandb(self._wandb.summary.update, {k: v for k, v in metrics.items() if v is not None})

    def log_results(self, names: list[str], rows: Rows, metrics: dict[str, Any],
                    images: dict[str, Path], probes: list[str] | None = None, probe_rows: Rows | None = None) -> None:
        """The end of a run: metrics (AA, BWT, FWT, F, AIA, OP, sharpness, probes, ...) into the summary, the
        accuracy matrix as the table `acc_matrix` (the probes' as `probe_matrix`), and each existing PNG as the
        image `plots/<name>`."""
        if self._wandb is None:
            return
        import wandb

        self.log_summary(metrics)

        def log_table_and_images() -> None:  # wandb.Image copies the PNG into the wandb folder: it may fail
            table = wandb.Table(columns=["after_task", *names], data=[[after, *scores] for after, scores in rows])
            tables = {"acc_matrix": table}
            if probes:
                tables["probe_matrix"] = wandb.Table(columns=["after_task", *probes],
                                                     data=[[after, *scores] for after, scores in probe_rows or []])
            self._wandb.log(tables | {f"plots/{name}": wandb.Image(str(path))
                                      for name, path in images.items() if path.is_file()})

        self._to_wandb(log_table_and_images)


def _online_budget(options: dict[str, Any], mode: str, init_timeout: float) -> dict[str, Any]:
    """An online wandb.init gets init_timeout less OFFLINE_START, so that the offline fallback too is done within
    init_timeout (wandb's own timeout bounds only its wait for the server)."""
    if mode != "online":
        return options
    import wandb

    budget = max(init_timeout / 2, init_timeout - OFFLINE_START)
    return options | {"settings": wandb.Settings(init_timeout=budget, console="off")}


def _finish(run, exit_code: int, timeout: float) -> None:
    """`run.finish(exit_code)`, waiting at most `timeout` seconds; a failure or a timeout is a warning."""
    failure: list[BaseException] = []

    def finish() -> None:
        import wandb

        try:
            run.finish(exit_code=exit_code)
        except BaseException as exc:
            failure.append(exc)
        try:  # wandb's service writes the local run files until it closes them: after this they are complete,
            wandb.teardown()  # and process exit has no wandb process left to wait for
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=finish, daemon=True, name="wandb-finish")
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or failure:
        why = f"did not finish within {timeout:g} s" if thread.is_alive() else (
            "no space left on device" if disk_full_error(failure[0]) else str(failure[0]).strip() or
            type(failure[0]).__name__)
        print(f"warning: wandb: {why}; its local run may be incomplete (the run's results files are not)",
              file=sys.stderr, flush=True)


def _quiet_wandb_logging() -> None:
    """wandb's own debug log must not print a traceback to the console when its file cannot be written (a full
    disk): logging's handleError would, once per message."""
    import logging

    for name in ("wandb", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.FileHandler) and "wandb" in str(getattr(handler, "baseFilename", "")):
                handler.handleError = lambda record: None

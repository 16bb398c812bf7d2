"""Starting a run in its results folder, or resuming one: what the folder already holds (the rows of the
tasks it completed, the config it was started with, its meta), whether the new config may continue it, and
the log surgery that makes a resumed run's train_log.jsonl read as one uninterrupted run.

config.yaml is read once per start (`RunDir.read_document`), by rank 0; every rank gets the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cl_flat import dist
from cl_flat.config import RunConfig, config_to_dict
from cl_flat.data.fingerprints import data_changes
from cl_flat.errors import DataError, UserError
from cl_flat.files import atomic_write_text
from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.metrics import ZERO_SHOT, Rows
from cl_flat.overrides import dotted_keys
from cl_flat.rundir.adapter_check import adapter_problems
from cl_flat.rundir.layout import RunDir, meta_of


@dataclass(frozen=True)
class Restart:
    """Where a run starts: the saved rows it keeps (zero_shot + completed tasks; empty for a fresh start),
    the config changes it accepted, and the meta of the stored config.yaml (empty unless resuming)."""

    rows: Rows
    changes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    probe_rows: Rows = field(default_factory=list)  # probe_matrix.csv's rows of `rows` (none without probes)

    @property
    def done(self) -> int:
        """How many tasks are restored, not trained again."""
        return max(len(self.rows) - 1, 0)


def config_changes(stored: RunConfig, config: RunConfig) -> list[str]:
    """Each field where `config` differs from the `stored` one: "key: stored → new"."""
    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(absent)"

    ours, theirs = dotted_keys(config_to_dict(config)), dotted_keys(config_to_dict(stored))
    return [f"{key}: {shown(theirs, key)} → {shown(ours, key)}" for key in sorted(set(ours) | set(theirs))
            if key != LOCATION and (key not in ours or key not in theirs or ours[key] != theirs[key])]


LOCATION = "run.output_dir"  # where the folder lies, not what the run computes: a moved folder resumes


def _refuse_fresh_start(run_dir: RunDir) -> None:
    if run_dir.metrics_path.exists():
        raise UserError(f"{run_dir.path} already holds a complete run; choose another run.name "
                        "(--set run.name=...), or replace it with --overwrite")
    if run_dir.matrix_path.exists():
        raise UserError(f"{run_dir.path} holds a started run; continue it with --resume, start it afresh with "
                        "--overwrite, or choose another run.name")


def completed_rows(run_dir: RunDir, config: RunConfig, resume: bool, allow_changes: bool = False,
                   overwrite: bool = False) -> Restart:
    """The saved rows to resume from, or an error if the folder is in use; empty for a fresh start (which
    `overwrite` allows over an earlier run). A resumed config must equal the stored one unless
    `allow_changes` (then the changes apply to the tasks still to train)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite: choose one (continue the run, or start it afresh)")
    if not resume:
        if not overwrite:
            _refuse_fresh_start(run_dir)
        return Restart([], [])
    if run_dir.metrics_path.exists():
        raise UserError(f"{run_dir.path} is already complete; nothing to resume")
    if not run_dir.matrix_path.exists():
        return Restart([], [], run_dir.stored_meta())
    document = run_dir.read_document()
    changes = config_changes(run_dir.config_of(document), config)
    data = data_changes(meta_of(document), config)
    if data and not allow_changes:
        raise DataError(f"--resume: a data file changed since the run started ({run_dir.config_path} holds its "
                        f"fingerprint):\n" + "".join(f"  - {c}\n" for c in data)
                        + "restore the file, or pass --allow-config-change to train the remaining tasks on it")
    changes += data
    if changes and not allow_changes:
        raise UserError(f"--resume: the config differs from {run_dir.config_path}:\n"
                        + "".join(f"  - {c}\n" for c in changes)
                        + "resume with the same config and overrides, or pass --allow-config-change to train "
                          "the remaining tasks with the new values (the in-flight task restarts)")
    names, rows, zero_shot = read_acc_matrix(run_dir.matrix_path, allow_partial=True)
    if zero_shot is None:
        return Restart([], [], meta_of(document))
    done = 0
    for name in names[:len(rows)]:
        if not (run_dir.adapter_dir(name) / RunDir.ADAPTER_WEIGHTS).is_file():
            break
        done += 1
    if done:  # the stack --resume reloads, checked before anything is written
        problems = adapter_problems([d for _, d in run_dir.adapter_dirs(config, names[done - 1])], config.lora.r)
        if problems:
            raise DataError(f"--resume: {problems[0]}")
    run_dir.logged_updates()  # the log it truncates, checked before anything is written too
    kept = [(ZERO_SHOT, zero_shot)] + [(names[i], rows[i]) for i in range(done)]
    probe_rows = run_dir.restored_probe_rows([p.name for p in config.probes], [after for after, _ in kept])
    return Restart(kept, changes, meta_of(document), probe_rows)


def restart(run_dir: RunDir, config: RunConfig, resume: bool, allow_changes: bool,
            overwrite: bool = False) -> Restart:
    """`completed_rows` read by rank 0; every rank gets the same answer or the same error."""
    outcome: Restart | tuple[int, str] = Restart([], [])
    if dist.is_main():
        try:
            outcome = completed_rows(run_dir, config, resume, allow_changes, overwrite)
        except UserError as exc:
            outcome = (exc.exit_code, str(exc))  # malformed input (exit 2) stays exit 2 on every rank
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, tuple):
        raise (DataError if outcome[0] == DataError.exit_code else UserError)(outcome[1])
    return outcome


def truncate_log(run_dir: RunDir, done: int, updates: int = 0) -> list[dict[str, Any]]:
    """Keep the log lines of the first `done` tasks and of the next task's first `updates` updates (those
    its checkpoint holds), so the log reads as one uninterrupted run. Returns the records kept."""
    if not run_dir.log_path.exists():
        return []
    kept = [(line, record) for line, record in run_dir.logged_updates()
            if record["task_index"] < done or (record["task_index"] == done and record["step"] <= updates)]
    atomic_write_text(run_dir.log_path, "".join(line + "\n" for line, _ in kept))
    return [record for _, record in kept]


def skipped_updates(records: list[dict[str, Any]], names: list[str]) -> dict[str, int]:
    """Per task in `names`, the updates the log `records` show dropped as non-finite (`on_nonfinite: skip`)."""
    counts = dict.fromkeys(names, 0)
    for record in records:
        if record.get("skipped") and record["task"] in counts:
            counts[record["task"]] += 1
    return counts

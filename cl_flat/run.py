"""run_sequence(): for each task: add adapter -> train -> save -> evaluate every task.

Results folder (DESIGN.md contract): config.yaml, acc_matrix.csv (rewritten after every
task, so completed tasks are never lost), adapters/<task>/, train_log.jsonl, plots/ and, last,
metrics.json — its presence marks a complete run. Only rank 0 writes.
"""

from __future__ import annotations

import json
import platform
import subprocess
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from cl_flat import engine as ds
from cl_flat.adapters import SEQLORA_ADAPTER, AdapterStack
from cl_flat.config import ConfigError, RunConfig, UserError, config_to_dict, validate_config
from cl_flat.data import load_task
from cl_flat.data.batches import encode_examples
from cl_flat.evaluate import evaluate_tasks
from cl_flat.files import atomic_write_text
from cl_flat.flatness import build_method
from cl_flat.metrics import ZERO_SHOT, compute_metrics, read_acc_matrix, write_acc_matrix
from cl_flat.models import check_target_modules, load_model
from cl_flat.tracking import Tracker
from cl_flat.train import train_task

CONFIG_FILE, MATRIX_FILE, METRICS_FILE = "config.yaml", "acc_matrix.csv", "metrics.json"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(config: RunConfig) -> dict[str, Any]:
    import deepspeed
    import peft
    import transformers

    from cl_flat import __version__

    world = ds.world_size()
    t = config.training
    return {"world_size": world, "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * world,
            "versions": {"cl_flat": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "deepspeed": deepspeed.__version__},
            "git_commit": _git_commit()}


def save_run_config(config: RunConfig, run_dir: Path) -> None:
    document = config_to_dict(config) | {"meta": run_metadata(config)}
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(document, sort_keys=False))


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a cl-flat run folder ({CONFIG_FILE} is missing)")
    raw = yaml.safe_load(path.read_text())
    raw.pop("meta", None)
    return validate_config(raw, str(path))


def prepare(config: RunConfig):
    """Everything that can fail on bad input, before any file is written:
    the method's own checks, every task's data, the model and its target modules."""
    method = build_method(config.flatness)
    problems = method.check(config)
    if problems:
        raise ConfigError("config", problems)
    tasks = [load_task(task, config) for task in config.tasks]
    model, tokenizer = load_model(config.model.name_or_path, config.model.dtype, config.run.seed)
    check_target_modules(config.lora.target_modules, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()})
    return method, tasks, model, tokenizer


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} upd/s"),
                    TimeRemainingColumn(), transient=False)


class _Bars:
    """rich.Progress with the fields our columns expect."""

    def __init__(self, progress):
        self.progress = progress

    def add_task(self, name: str, total: int):
        return self.progress.add_task(name, total=total, loss=float("nan"), rate=0.0)

    def update(self, bar, **fields):
        self.progress.update(bar, **fields)


def _check_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> list[tuple[str, list[float]]]:
    """The saved rows (zero_shot + completed tasks) to resume from, or an error if the folder is
    in use; empty for a fresh start."""
    if not resume:
        if (run_dir / METRICS_FILE).exists():
            raise UserError(f"{run_dir} already holds a complete run; choose another run.name (--set run.name=...)")
        if (run_dir / MATRIX_FILE).exists():
            raise UserError(f"{run_dir} holds a started run; continue it with --resume, or choose another run.name")
        return []
    if (run_dir / METRICS_FILE).exists():
        raise UserError(f"{run_dir} is already complete; nothing to resume")
    if not (run_dir / MATRIX_FILE).exists():
        return []
    saved = load_run_config(run_dir)
    if config_to_dict(saved) != config_to_dict(config):
        ours, theirs = config_to_dict(config), config_to_dict(saved)
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise UserError(f"--resume: the config differs from the one in {run_dir} (sections {changed}); "
                        "resume with the same config and overrides")
    names, rows, zero_shot = read_acc_matrix(run_dir / MATRIX_FILE, allow_partial=True)
    if zero_shot is None:
        return []
    done = 0
    for name in names[:len(rows)]:
        if not (run_dir / "adapters" / name / "adapter_model.safetensors").is_file():
            break
        done += 1
    return [(ZERO_SHOT, zero_shot)] + [(names[i], rows[i]) for i in range(done)]


def _truncate_log(path: Path, done: int) -> None:
    """Drop log lines of the interrupted task, so the log reads as one uninterrupted run."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["task_index"] < done]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _record_sharpness(config: RunConfig, run_dir: Path, stack: AdapterStack, tokenizer, task, is_main: bool) -> None:
    """Sharpness of the solution just trained (collective: every rank calls it), saved under
    landscape/sharpness.json keyed by task, like `cl-flat landscape`."""
    from cl_flat.landscape import compute_sharpness, landscape_stem, merge_sharpness

    record = compute_sharpness(stack.model, tokenizer, task, config, stack.current, progress=False)
    if is_main:
        merge_sharpness(run_dir, landscape_stem(task.name, None, config.evaluation.sharpness_space), record)


def _saved_sharpness(run_dir: Path, names: list[str]) -> dict[str, Any]:
    from cl_flat.landscape import SHARPNESS_FILE

    path = run_dir / "landscape" / SHARPNESS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {key: value for key, value in saved.items() if key.split("_merged")[0] in names}


def run_sequence(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate the sequence. With `resume`, tasks whose adapter and matrix row are
    saved are reloaded, not retrained; per-task randomness is keyed by (seed, task index), so
    the final matrix equals that of an uninterrupted run."""
    ds.init_distributed()
    is_main = ds.rank() == 0
    run_dir = config.run.output_dir / config.run.name
    outcome: list | str = []
    if is_main:
        try:
            outcome = _check_run_dir(config, run_dir, resume)
        except UserError as exc:
            outcome = str(exc)
    outcome = ds.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    restored = outcome
    done = max(len(restored) - 1, 0)
    method, tasks, model, tokenizer = prepare(config)
    device = ds.device()
    model.to(device)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, run_dir)
        if done:
            _truncate_log(run_dir / "train_log.jsonl", done)
    tracker = Tracker(config, run_dir, active=is_main)
    names = [t.name for t in tasks]
    train_sets = [encode_examples(t, tokenizer, t.train, config.training.max_seq_length) for t in tasks]
    rows: list[tuple[str, list[float]]] = []

    def record(after: str, scores: list[float]) -> None:
        rows.append((after, scores))
        tracker.log_scores(after, names, scores)
        if is_main:
            write_acc_matrix(run_dir / MATRIX_FILE, names, rows)

    if done:
        rows.extend(restored)
        saved = [(stack_name, run_dir / "adapters" / name) for name, stack_name in
                 zip(names[:done], names[:done] if config.lora.strategy == "inclora" else [SEQLORA_ADAPTER] * done)]
        stack = AdapterStack.load(model, config.lora, saved if config.lora.strategy == "inclora" else saved[-1:],
                                  seed=config.run.seed)
    else:
        record(ZERO_SHOT, evaluate_tasks(model, tokenizer, tasks, config, device))
        stack = AdapterStack(model, config.lora, config.run.seed)
    with _progress(is_main and config.logging.progress) as progress:
        bars = _Bars(progress) if progress is not None else None
        for index, task in enumerate(tasks[done:], start=done):
            stack.add_task(index, task.name)
            params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
            train_task(config, stack.model, params, method, train_sets[index], tokenizer.pad_token_id, index,
                       task.name, tracker.log_update, bars)
            stack.check_trainable()
            if is_main:
                stack.save_current(run_dir / "adapters" / task.name)
            record(task.name, evaluate_tasks(stack.model, tokenizer, tasks, config, device))
            if config.evaluation.sharpness:
                _record_sharpness(config, run_dir, stack, tokenizer, task, is_main)
    metrics = compute_metrics([r for _, r in rows[1:]], rows[0][1])
    if config.evaluation.sharpness:
        metrics["sharpness"] = _saved_sharpness(run_dir, names) if is_main else None
    if is_main:
        from cl_flat import plots

        plots.plot_acc_matrix(run_dir / MATRIX_FILE, run_dir / "plots" / "acc_matrix.png")
        plots.plot_op_curve(run_dir / MATRIX_FILE, run_dir / "plots" / "op_curve.png")
        plots.plot_learning_curves(run_dir / "train_log.jsonl", run_dir / "plots" / "learning_curves.png")
        atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics | {"tasks": names}, indent=2) + "\n")
    tracker.finish(metrics)
    ds.barrier()
    return {"run_dir": str(run_dir), "tasks": names, "rows": rows, "metrics": metrics}


def reevaluate(run_dir: Path) -> dict[str, Any]:
    """Reload the saved adapter stack in order and evaluate every task (`cl-flat eval`)."""
    config = load_run_config(run_dir)
    names, matrix, _ = read_acc_matrix(run_dir / MATRIX_FILE)
    ds.init_distributed()
    tasks = [load_task(task, config) for task in config.tasks]
    model, tokenizer = load_model(config.model.name_or_path, config.model.dtype, config.run.seed)
    if config.deepspeed.bf16:
        model.to(torch.bfloat16)
    if config.lora.strategy == "seqlora":
        dirs = [(SEQLORA_ADAPTER, run_dir / "adapters" / names[-1])]
    else:
        dirs = [(name, run_dir / "adapters" / name) for name in names]
    missing = [str(d) for _, d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"{run_dir}: adapter folder(s) missing: {missing}")
    stack = AdapterStack.load(model, config.lora, dirs)
    device = ds.device()
    stack.model.to(device)
    scores = evaluate_tasks(stack.model, tokenizer, tasks, config, device)
    return {"tasks": names, "scores": scores, "saved": matrix[-1]}

"""`cl-flat bench`: seconds per update and peak memory of every flatness method, as ratios
against plain training (`none`) and against the hand-written torch + peft floor (`floor`), both
measured in the same invocation.

Each variant runs in a fresh process (a fresh peak-memory count: the CUDA allocator's peak
on GPU, the process's peak resident memory on CPU) through the real update path: a DeepSpeed
engine, `method.window` over the micro-batches, one `engine.step()`. A fixed synthetic batch
of micro_batch_size × max_seq_length tokens (every token a target) is reused, so only the
method's cost differs. Reported: the median over the timed updates after warm-up, and the
peak memory at that point. Then, for a variant with a flatness method, `none` and the method
alternate for as many updates again in the same process (same engine, same heap): its time
ratio is the median of those paired ratios. (Fresh processes on a shared machine run 5-10%
faster or slower than each other, which moved cross-process ratios by as much as the goals'
margins.) `floor` and `none` themselves are compared across processes.

Two extra rows make the floor visible: `floor` is a hand-written torch + peft AdamW step on
the same model and batch (no DeepSpeed, no tool code), and `rwp_full_stored_noise` is RWP
with noise on the whole model implemented naively (every layer's ε drawn, stored and added in
place, as the reference code does), to show what not storing the noise saves. Variants whose
label ends in `_2ranks` run in two processes and are compared with `none_2ranks`.

Against the floor: `floor` runs in every invocation with a one-process variant, and a variant's
`time_ratio_floor` per round is its time ratio to `none` times none's time over floor's time in
that round (for a paired variant: its in-process ratio to `none`, chained to none/floor across
processes), the median over rounds. Two-process variants have no two-process floor (null).
`rwp_full_one_pass` is two-batch RWP with `one_pass: true` (clean half and noisy half of the
micro-batch in one forward).

A failing variant is recorded with its error and the others go on; the result so far is handed
on after every variant (the CLI saves it), so a long bench loses nothing it measured.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cl_flat import dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import load_config
from cl_flat.errors import ConfigError, UserError
from cl_flat.files import atomic_write_text
from cl_flat.flatness import FlatnessMethod, build_method
from cl_flat.flatness.noise import frozen_targets
from cl_flat.loss import target_loss, target_split_losses
from cl_flat.models import load_model
from cl_flat.train import BatchShape, EngineContext, TaskPlan, create_engine

VARIANTS: dict[str, tuple[dict[str, Any] | None, int]] = {
    "none": ({"method": "none"}, 1),
    "floor": (None, 1),
    "sam": ({"method": "sam", "rho": 0.05}, 1),
    "asam": ({"method": "sam", "rho": 0.5, "adaptive": True}, 1),
    "rwp_lora": ({"method": "rwp", "scope": "lora"}, 1),
    "rwp_full": ({"method": "rwp", "scope": "full"}, 1),
    "rwp_base": ({"method": "rwp", "scope": "base"}, 1),
    "rwp_full_one_pass": ({"method": "rwp", "scope": "full", "two_batch": True, "one_pass": True}, 1),
    "rwp_full_stored_noise": ({"method": "rwp", "scope": "full"}, 1),
    "lpf_sgd": ({"method": "lpf_sgd"}, 1),
    "flat_lora": ({"method": "flat_lora"}, 1),
    "none_2ranks": ({"method": "none"}, 2),
    "rwp_parallel_2ranks": ({"method": "rwp", "scope": "full", "parallel": True}, 2),
}


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(config, vocab_size: int, device) -> list[dict[str, torch.Tensor]]:
    t = config.training
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(t.gradient_accumulation_steps):
        ids = torch.randint(0, vocab_size, (t.micro_batch_size, t.max_seq_length), generator=generator)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    return batches


class StoredNoiseRwp(FlatnessMethod):
    """The naive full-scope RWP the benchmark compares against (never registered, never used for
    training): every adapted layer's ε is drawn, stored and added to W0 in place, then subtracted.
    The task hooks are the interface's defaults (nothing to prepare or keep)."""

    name = "rwp_full_stored_noise"
    formula = "RWP scope full with ε stored"

    def window(self, ctx, micro_batches):
        n, a, b = len(micro_batches), self.config.a, self.config.b
        for batch in micro_batches:
            ctx.accumulate(batch, a / n, last=False)
        weights = [target.weight for target in frozen_targets(ctx.module)]
        stored = [torch.randn_like(w) * self.config.noise_std for w in weights]
        with torch.no_grad():
            for w, e in zip(weights, stored):
                w.add_(e)
        try:
            ctx.accumulate(micro_batches[-1], b, last=True)
        finally:
            with torch.no_grad():
                for w, e in zip(weights, stored):
                    w.sub_(e)
        return {"loss": 0.0}


def measure(config_path: str, label: str, updates: int, warmup: int) -> dict[str, Any]:
    """One variant in this process (or this process group): median s/update and peak memory."""
    flatness, _ = VARIANTS[label]
    dist.init_distributed()
    world = dist.world_size()
    if not torch.cuda.is_available() and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = load_config(config_path, [] if flatness is None else [f"flatness={json.dumps(flatness)}"])
    model, _ = load_model(config.model.name_or_path, config.model.dtype, config.run.seed)
    device = dist.device()
    model.to(device)
    stack = AdapterStack(model, config.lora, config.run.seed)
    stack.add_task(0, config.tasks[0].name)
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    batches = _batches(config, model.config.vocab_size, device)
    times: list[float] = []
    paired = flatness is not None and flatness["method"] != "none"  # also timed against `none`, see below
    if flatness is None:  # the floor: plain torch + peft, no DeepSpeed, no tool code
        peft_model = stack.model
        if config.deepspeed.bf16:
            peft_model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(list(params.values()), lr=config.training.learning_rate)
        for _ in range(warmup + updates):
            start = time.perf_counter()
            for batch in batches:
                (peft_model(**batch).loss / len(batches)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize()
            times.append(time.perf_counter() - start)
    else:
        method = StoredNoiseRwp(config.flatness) if label == "rwp_full_stored_noise" else build_method(config.flatness)
        t = config.training
        total = warmup + updates * (3 if paired else 1)
        plan = TaskPlan(BatchShape.of(t, world), total, total)
        engine = create_engine(t, config.deepspeed, stack.model, list(params.values()), plan)
        method.begin_task(engine.module)

        def update(method, step: int) -> float:
            start = time.perf_counter()
            ctx = EngineContext(engine, target_loss, params, step=step, total_steps=total,
                                seed=config.run.seed, rank=dist.rank(), world_size=world,
                                split_loss_fn=target_split_losses)
            method.window(ctx, batches)
            engine.step()
            _synchronize()
            return max(dist.all_gather_objects(time.perf_counter() - start))  # the slowest rank

        times = [update(method, step) for step in range(warmup + updates)]
    timed = times[warmup:]
    peak = max(dist.all_gather_objects(_peak_memory()))
    result = {"seconds_per_update": statistics.median(timed), "peak_memory_bytes": peak, "updates": len(timed),
              "ranks": world}
    if paired:
        # then `none` and the method alternate in this process: a ratio per pair, immune to the
        # ±5-10% by which fresh processes on a shared machine differ (after the memory reading,
        # so `none` cannot raise this variant's peak)
        baseline, step, ratios = build_method({"method": "none"}), warmup + updates, []
        baseline.begin_task(engine.module)
        for _ in range(updates):
            plain = update(baseline, step)
            ratios.append(update(method, step + 1) / plain)
            step += 2
        result["paired_time_ratio"] = statistics.median(ratios)
    return result


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _run_variant(config_path: str, label: str, updates: int, warmup: int) -> dict[str, Any]:
    nproc = VARIANTS[label][1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = ["-m", "cl_flat.bench", config_path, label, str(updates), str(warmup), str(out)]
        if nproc == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *worker]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise UserError(f"bench variant {label!r} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def run_bench(config_path: str, labels: list[str], updates: int, warmup: int, rounds: int = 1,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run each variant in a fresh process, `rounds` times over (every variant once per round,
    so slow drifts of a shared machine hit all variants alike). Per round, a variant's time ratio
    is its in-process paired ratio, or (floor) its time over that of `none` of the SAME round;
    memory is compared with `none` (1 rank) or `none_2ranks` of the same round. Reported: medians
    over rounds, and the largest peak memory. A variant that fails is recorded with its error and
    the others go on; `on_progress` receives the result so far after every variant run (to save it)."""
    config = load_config(config_path)
    unknown = [label for label in labels if label not in VARIANTS]
    problems = [f"--methods: unknown variant(s) {unknown}; available: {list(VARIANTS)}"] if unknown else []
    problems += [f"--{flag}: expected at least {low}, got {value}"
                 for flag, value, low in (("updates", updates, 1), ("warmup", warmup, 0), ("rounds", rounds, 1))
                 if value < low]
    if problems:
        raise ConfigError("cl-flat bench", problems, kind="options")
    needed = list(dict.fromkeys(
        (["none", "floor"] if any(VARIANTS[label][1] == 1 for label in labels) else [])
        + (["none_2ranks"] if any(VARIANTS[label][1] == 2 for label in labels) else []) + labels))
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label in needed}
    header = {"device": _device_name(), "model": config.model.name_or_path, "config": str(config_path),
              "batch": f"{config.training.micro_batch_size} x {config.training.max_seq_length} tokens"
                       f" x {config.training.gradient_accumulation_steps} micro-batches",
              "lora": {"r": config.lora.r, "target_modules": config.lora.target_modules},
              "precision": "bf16" if config.deepspeed.bf16 else "fp32", "zero_stage": config.deepspeed.zero_stage,
              "updates": updates, "warmup": warmup, "threads": torch.get_num_threads()}
    result: dict[str, Any] = {}
    for done in range(1, rounds + 1):
        for label in needed:
            try:
                raw[label].append(_run_variant(config_path, label, updates, warmup))
            except UserError as error:
                raw[label].append({"error": str(error)})
            result = {**header, "rounds": done,
                      "methods": {label: _summarize(label, raw) for label in needed if raw[label]}}
            if on_progress is not None:
                on_progress(result)
    return result


def _summarize(label: str, raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One variant's row over the rounds in which it and the runs it is compared with all succeeded."""
    base_label = "none_2ranks" if VARIANTS[label][1] == 2 else "none"  # runs before `label` in every round
    floor = raw.get("floor", []) if base_label == "none" else []
    rounds = [(r, b, floor[i] if i < len(floor) else {"error": "not run"})
              for i, (r, b) in enumerate(zip(raw[label], raw[base_label])) if "error" not in r and "error" not in b]
    if not rounds:
        failed = [r for r in raw[label] + raw[base_label] if "error" in r]
        return {"error": failed[-1]["error"], "compared_with": base_label}
    runs = [r for r, _, _ in rounds]
    ratios = [r.get("paired_time_ratio", r["seconds_per_update"] / b["seconds_per_update"]) for r, b, _ in rounds]
    floor_ratios = [ratio * b["seconds_per_update"] / f["seconds_per_update"]
                    for ratio, (_, b, f) in zip(ratios, rounds) if "error" not in f]
    row = {"seconds_per_update": statistics.median(r["seconds_per_update"] for r in runs),
           "time_ratio": statistics.median(ratios),
           "time_ratio_paired_in_process": "paired_time_ratio" in runs[0],
           "time_ratio_floor": statistics.median(floor_ratios) if floor_ratios else None,
           "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
           "memory_ratio": statistics.median(r["peak_memory_bytes"] / b["peak_memory_bytes"] for r, b, _ in rounds),
           "compared_with": base_label, "updates": runs[0]["updates"], "ranks": runs[0]["ranks"],
           "rounds": [r.get("seconds_per_update") for r in raw[label]]}
    failed = [r["error"] for r in raw[label] if "error" in r]
    return {**row, "failed_rounds": len(failed), "error": failed[-1]} if failed else row


def failed_variants(result: dict[str, Any]) -> list[str]:
    """The variants with an error in any round."""
    return [label for label, m in result["methods"].items() if "error" in m]


def markdown_table(result: dict[str, Any]) -> str:
    lines = [f"# cl-flat bench: {result['model']} on {result['device']}", "",
             f"batch {result['batch']}, {result['precision']}, ZeRO {result['zero_stage']}, "
             f"LoRA r={result['lora']['r']} on {', '.join(result['lora']['target_modules'])}; "
             f"median of {result['updates']} updates after {result['warmup']} warm-up, "
             f"{result.get('rounds', 1)} round(s), each variant in a fresh process; time ratios of methods paired "
             f"update by update with `none` in the same process, others within a round; × floor: the ratio to "
             f"the hand-written torch + peft loop of the same round (× none times none/floor)",
             "",
             "| method | s/update | time × none | time × floor | peak memory (MiB) | memory ratio | vs |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, m in result["methods"].items():
        if "seconds_per_update" not in m:
            lines.append(f"| {label} | failed | — | — | — | — | {m['compared_with']} |")
            continue
        floor = m.get("time_ratio_floor")
        lines.append(f"| {label} | {m['seconds_per_update']:.3f} | {m['time_ratio']:.3f} | "
                     f"{'—' if floor is None else f'{floor:.3f}'} | "
                     f"{m['peak_memory_bytes'] / 2**20:.0f} | {m['memory_ratio']:.3f} | {m['compared_with']} |")
    failures = failed_variants(result)
    if failures:
        lines += ["", "Failed (a row above, if any, is over the rounds that succeeded):", ""]
        lines += [f"- {label}: {result['methods'][label]['error'].strip().splitlines()[-1]}" for label in failures]
    return "\n".join(lines) + "\n"


def bench_paths(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """The JSON and markdown files of `result`: <config>-<device>.{json,md} in `out_dir`."""
    device = "".join(c if c.isalnum() else "-" for c in result["device"].split(" (")[0].lower()).strip("-")
    stem = f"{Path(result['config']).stem}-{device}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def save_bench(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = bench_paths(result, out_dir)
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, markdown_table(result))
    return json_path, md_path


if __name__ == "__main__":  # worker: python -m cl_flat.bench CONFIG LABEL UPDATES WARMUP OUT
    config_arg, label_arg, updates_arg, warmup_arg, out_arg = sys.argv[1:6]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    outcome = measure(config_arg, label_arg, int(updates_arg), int(warmup_arg))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_arg).write_text(json.dumps(outcome))
    dist.shutdown()

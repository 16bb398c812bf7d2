"""`cl-flat bench`: seconds per update and peak memory of every flatness method, as ratios
against plain training (`none`) and against the hand-written torch + peft floor (`floor`), both
measured in the same invocation.

Each variant runs in a fresh process (a fresh peak-memory count: the CUDA allocator's peak
on GPU, the process's peak resident memory on CPU; the measuring is `cl_flat.bench.measure`) through
the update training runs (`train.one_update` on a DeepSpeed engine: `method.window` over the
micro-batches, the non-finite check, one `engine.step()`). A fixed synthetic batch
of micro_batch_size × max_seq_length tokens (every token a target) is reused, so only the
method's cost differs. Reported: the median over the timed updates after warm-up, and the
peak memory at that point. Then, for a variant with a flatness method, `none` and the method
alternate for about as many updates again in the same process (same engine, same heap), in
quartets none, method, method, none: its time ratio is the median of the quartets' ratios
(`bench.quartet_ratio`). (Fresh processes on a shared machine run 5-10% faster or slower than
each other, which moved cross-process ratios by as much as the goals' margins.) Likewise `floor`
and `none` alternate in the floor's process after its timing: floor's time ratio to `none` is paired
too; `none` and `none_2ranks` are timed in their own processes. With several rounds a row keeps each
round's time ratio (`time_ratio_rounds`) beside their median: the same code's ratio moves between runs
minutes apart by more than the pairing cancels.

Two extra rows make the floor visible: `floor` is a hand-written torch + peft AdamW step on
the same model and batch (no DeepSpeed, no tool code), and `rwp_full_stored_noise` is RWP
with noise on the whole model implemented naively (every layer's ε drawn, stored and added in
place, as the reference code does), to show what not storing the noise saves. Variants whose
label ends in `_2ranks` run in two processes and are compared with `none_2ranks`.

Against the floor: `floor` runs in every invocation with a one-process variant, and a variant's
`time_ratio_floor` per round is its time ratio to `none` times none's time over floor's time in
that round (its in-process ratio to `none`, chained to none/floor paired in the floor's process), the
median over rounds. Two-process variants have no two-process floor (null).
`rwp_full_one_pass` is two-batch RWP with `one_pass: true` (clean half and noisy half of the
micro-batch in one forward).

With `evaluation`, each round also times the evaluation rows (`cl_flat.bench.EVAL_ROWS`, each in a fresh
process): examples per second of rank classification over ten multi-word labels and of exact match
(greedy generation), one batch of `evaluation.batch_size` synthetic examples per pass; reported: the median
over rounds, under `evaluation` in the JSON and in a table of its own.

A failing variant is recorded with its error and the others go on; the result so far is handed
on after every variant (the CLI saves it), so a long bench loses nothing it measured.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cl_flat.bench import EVAL_ROWS, variants
from cl_flat.config import load_config
from cl_flat.errors import ConfigError, UserError
from cl_flat.files import atomic_write_text
from cl_flat.overrides import override_keys


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _run_variant(config_path: str, label: str, updates: int, warmup: int, overrides: list[str]) -> dict[str, Any]:
    nproc = 1 if label in EVAL_ROWS else variants()[label][1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = ["-m", "cl_flat.bench", config_path, label, str(updates), str(warmup), str(out), *overrides]
        if nproc == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *worker]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise UserError(f"bench variant {label!r} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_bench(config_path: str, labels: list[str], updates: int, warmup: int, rounds: int = 1,
              on_progress: Callable[[dict[str, Any]], None] | None = None,
              evaluation: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run each variant in a fresh process, `rounds` times over (every variant once per round,
    so slow drifts of a shared machine hit all variants alike). Per round, a variant's time ratio
    is its in-process paired ratio, or (floor) its time over that of `none` of the SAME round;
    memory is compared with `none` (1 rank) or `none_2ranks` of the same round. Reported: medians
    over rounds, and the largest peak memory. A variant that fails is recorded with its error and
    the others go on; `on_progress` receives the result so far after every variant run (to save it).
    `evaluation`: also the evaluation rows, once per round after the variants (`evaluation_rows`).
    `overrides`: --set on the config, for every variant (flatness.* is the variants' own: refused)."""
    overrides = list(overrides)
    problems = [f"--set {key}: each variant sets the flatness section; change the bench's other settings only"
                for key in override_keys(overrides) if key.split(".")[0] == "flatness"]
    if problems:
        raise ConfigError("cl-flat bench", problems, kind="options")
    config = load_config(config_path, overrides)
    known = variants()
    unknown = [label for label in labels if label not in known]
    problems = [f"--methods: unknown variant(s) {unknown}; available: {list(known)}"] if unknown else []
    problems += [f"--{flag}: expected at least {low}, got {value}"
                 for flag, value, low in (("updates", updates, 1), ("warmup", warmup, 0), ("rounds", rounds, 1))
                 if value < low]
    if problems:
        raise ConfigError("cl-flat bench", problems, kind="options")
    needed = list(dict.fromkeys(
        (["none", "floor"] if any(known[label][1] == 1 for label in labels) else [])
        + (["none_2ranks"] if any(known[label][1] == 2 for label in labels) else []) + labels))
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label in needed}
    header = {"device": _device_name(), "model": config.model.name_or_path, "config": str(config_path),
              "batch": f"{config.training.micro_batch_size} x {config.training.max_seq_length} tokens"
                       f" x {config.training.gradient_accumulation_steps} micro-batches",
              "lora": {"r": config.lora.r, "target_modules": config.lora.target_modules},
              "precision": "bf16" if config.deepspeed.bf16 else "fp32", "zero_stage": config.deepspeed.zero_stage,
              "updates": updates, "warmup": warmup, "threads": torch.get_num_threads(),
              **({"overrides": overrides} if overrides else {})}
    result: dict[str, Any] = {}
    evals: dict[str, list[dict[str, Any]]] = {label: [] for label in (EVAL_ROWS if evaluation else ())}
    for done in range(1, rounds + 1):
        for label in needed + list(evals):
            try:
                measured = _run_variant(config_path, label, updates, warmup, overrides)
                (evals if label in evals else raw)[label].append(measured)
            except UserError as error:
                (evals if label in evals else raw)[label].append({"error": str(error)})
            result = {**header, "rounds": done,
                      "methods": {label: _summarize(label, raw) for label in needed if raw[label]}}
            if evaluation:
                result["evaluation"] = evaluation_rows(evals)
            if on_progress is not None:
                on_progress(result)
    return result


def evaluation_rows(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each evaluation row over its successful rounds: median examples/s and s/pass, the per-round
    examples/s, and the last error of a failed round."""
    rows: dict[str, Any] = {}
    for label, runs in raw.items():
        good, failed = [r for r in runs if "error" not in r], [r["error"] for r in runs if "error" in r]
        row: dict[str, Any] = {"error": failed[-1]} if failed else {}
        if good:
            row = {"examples_per_second": statistics.median(r["examples_per_second"] for r in good),
                   "seconds_per_pass": statistics.median(r["seconds_per_pass"] for r in good),
                   "examples": good[0]["examples"], "updates": good[0]["updates"],
                   "rounds": [r.get("examples_per_second") for r in runs], **row}
        if runs:
            rows[label] = row
    return rows


def _none_over_floor(none: dict[str, Any], floor: dict[str, Any]) -> float:
    """none's time over floor's in one round: paired in the floor's process where it was measured there (older
    results: the two processes' medians)."""
    if "paired_time_ratio" in floor:
        return 1 / floor["paired_time_ratio"]
    return none["seconds_per_update"] / floor["seconds_per_update"]


def _summarize(label: str, raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One variant's row over the rounds in which it and the runs it is compared with all succeeded."""
    base_label = "none_2ranks" if variants()[label][1] == 2 else "none"  # runs before `label` in every round
    floor = raw.get("floor", []) if base_label == "none" else []
    rounds = [(r, b, floor[i] if i < len(floor) else {"error": "not run"})
              for i, (r, b) in enumerate(zip(raw[label], raw[base_label])) if "error" not in r and "error" not in b]
    if not rounds:
        failed = [r for r in raw[label] + raw[base_label] if "error" in r]
        return {"error": failed[-1]["error"], "compared_with": base_label}
    runs = [r for r, _, _ in rounds]
    ratios = [r.get("paired_time_ratio", r["seconds_per_update"] / b["seconds_per_update"]) for r, b, _ in rounds]
    floor_ratios = [ratio * _none_over_floor(b, f) for ratio, (_, b, f) in zip(ratios, rounds) if "error" not in f]
    row = {"seconds_per_update": statistics.median(r["seconds_per_update"] for r in runs),
           "time_ratio": statistics.median(ratios),
           # one per round compared (none for the baseline itself): their spread is the machine's, not the code's
           **({"time_ratio_rounds": ratios} if label != base_label else {}),
           "time_ratio_paired_in_process": "paired_time_ratio" in runs[0],
           "time_ratio_floor": statistics.median(floor_ratios) if floor_ratios else None,
           "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
           # counted, not timed: the same in every round
           "device_ops_per_update": runs[-1].get("device_ops_per_update"),
           "host_syncs_per_update": runs[-1].get("host_syncs_per_update"),
           "memory_ratio": statistics.median(r["peak_memory_bytes"] / b["peak_memory_bytes"] for r, b, _ in rounds),
           "compared_with": base_label, "updates": runs[0]["updates"], "ranks": runs[0]["ranks"],
           "rounds": [r.get("seconds_per_update") for r in raw[label]]}
    failed = [r["error"] for r in raw[label] if "error" in r]
    return {**row, "failed_rounds": len(failed), "error": failed[-1]} if failed else row


def failed_variants(result: dict[str, Any]) -> list[str]:
    """The variants (and evaluation rows) with an error in any round."""
    return [label for label, m in (result["methods"] | result.get("evaluation", {})).items() if "error" in m]


def _round_range(ratios: list[float]) -> str:
    """'lowest–highest' of a row's per-round time ratios; — with fewer than two rounds."""
    return f"{min(ratios):.3f}–{max(ratios):.3f}" if len(ratios) > 1 else "—"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [f"# cl-flat bench: {result['model']} on {result['device']}", "",
             f"batch {result['batch']}, {result['precision']}, ZeRO {result['zero_stage']}, "
             f"LoRA r={result['lora']['r']} on {', '.join(result['lora']['target_modules'])}; "
             f"median of {result['updates']} updates after {result['warmup']} warm-up, "
             f"{result.get('rounds', 1)} round(s), each variant in a fresh process; time ratios of methods and of the "
             f"floor paired with `none` in the same process (quartets none, method, method, none), others "
             f"within a round; × floor: the ratio to the hand-written torch + peft loop of the same round (× none "
             f"times none/floor); device ops and "
             f"host syncs of one update, counted the same on any device (aten ops that launch a GPU kernel; "
             f"transformers' mask check is one sync per forward): on a CPU, the launch and sync overhead to "
             f"expect on a GPU; time × none by round: the lowest and highest round's ratio (a difference inside that "
             f"range is the machine's, not the code's)" + (f"; config overrides: {' '.join(result['overrides'])}"
                                   if result.get("overrides") else ""),
             "",
             "| method | s/update | time × none | time × floor | device ops | host syncs | peak memory (MiB) "
             "| memory ratio | vs | time × none by round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label, m in result["methods"].items():
        if "seconds_per_update" not in m:
            lines.append(f"| {label} | failed | — | — | — | — | — | — | {m['compared_with']} | — |")
            continue
        floor = m.get("time_ratio_floor")
        ops, syncs = m.get("device_ops_per_update"), m.get("host_syncs_per_update")
        lines.append(f"| {label} | {m['seconds_per_update']:.3f} | {m['time_ratio']:.3f} | "
                     f"{'—' if floor is None else f'{floor:.3f}'} | {'—' if ops is None else ops} | "
                     f"{'—' if syncs is None else syncs} | "
                     f"{m['peak_memory_bytes'] / 2**20:.0f} | {m['memory_ratio']:.3f} | {m['compared_with']} | "
                     f"{_round_range(m.get('time_ratio_rounds', []))} |")
    lines += _evaluation_table(result.get("evaluation", {}))
    failures = failed_variants(result)
    if failures:
        rows = result["methods"] | result.get("evaluation", {})
        lines += ["", "Failed (a row above, if any, is over the rounds that succeeded):", ""]
        lines += [f"- {label}: {rows[label]['error'].strip().splitlines()[-1]}" for label in failures]
    return "\n".join(lines) + "\n"


def _evaluation_table(rows: dict[str, Any]) -> list[str]:
    if not rows:
        return []
    first = next((r for r in rows.values() if "examples" in r), {})
    lines = ["", f"Evaluation: one batch of {first.get('examples', '?')} synthetic examples per pass (prompts of "
             "about max_seq_length tokens, ten multi-word labels), one LoRA adapter; median pass after warm-up, "
             "median over rounds", "", "| evaluation | examples/s | s/pass |", "|---|---:|---:|"]
    for label, row in rows.items():
        if "examples_per_second" not in row:
            lines.append(f"| {label} | failed | — |")
        else:
            lines.append(f"| {label} | {row['examples_per_second']:.2f} | {row['seconds_per_pass']:.3f} |")
    return lines


def bench_paths(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """The JSON and markdown files of `result`: <config>-<device>.{json,md} in `out_dir`."""
    device = "".join(c if c.isalnum() else "-" for c in result["device"].split(" (")[0].lower()).strip("-")
    stem = f"{Path(result['config']).stem}-{device}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def planned_paths(config_path: str, out_dir: Path) -> tuple[Path, Path]:
    """The files a bench of `config_path` on this machine writes (`bench_paths`), before it runs."""
    return bench_paths({"device": _device_name(), "config": config_path}, out_dir)


def save_bench(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = bench_paths(result, out_dir)
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, markdown_table(result))
    return json_path, md_path

"""The `cl-flat` command line. Parses arguments and overrides; no training logic here, and how a command
ends (one message and an exit code for every failure a user can act on) lives in `cl_flat.exits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cl_flat.console import App, format_metrics, print_matrix, print_probes, quiet_libraries
from cl_flat.exits import run_to_exit

app = App(help="Continual LoRA learning with flatness methods: train, evaluate, measure.")


def _print_version(value: bool) -> None:
    if value:
        from cl_flat import __version__

        typer.echo(f"cl-flat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="print the version and exit")] = False) -> None:
    """Continual LoRA learning with flatness methods: train, evaluate, measure."""

OVERRIDE_FORMS = {"allow_extra_args": True, "ignore_unknown_options": True}  # what a wandb agent writes
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config value: a.b=v (repeatable)")]


@app.command(context_settings=OVERRIDE_FORMS)
def train(ctx: typer.Context, config: Path, set_: SetOption = None,
          resume: Annotated[bool, typer.Option("--resume", help="continue a started run (CONFIG may be its run "
                                                              "folder: its saved config)")] = False,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="start afresh where a run of this name "
                                                  "exists: its files are removed once the config and data are "
                                                  "accepted")] = False,
          allow_config_change: Annotated[bool, typer.Option(
              "--allow-config-change", help="with --resume: train the remaining tasks with a changed config "
              "(recorded in config.yaml meta.config_changes)")] = False,
          reference: Annotated[Optional[str], typer.Option(
              "--reference", metavar="per_task|joint", help="per_task: each task on a fresh adapter alone; joint: one "
              "adapter on all tasks' data; written to results/<run.name>-<kind>/")] = None) -> None:
    """Run the task sequence and write results/<run.name>/ (or one of its reference runs).

    Overrides follow CONFIG, in any form a wandb agent writes:
    --set k=v, --k=v (${args}), --k v (${args_no_equals}) or k=v (${args_no_hyphens}).
    --set ones apply last; a later value wins."""
    from cl_flat import dist
    from cl_flat.config import load_config
    from cl_flat.overrides import overrides_from_args
    from cl_flat.recipes.train import run_sequence
    from cl_flat.tracking import sweep_run_id

    cfg = load_config(config, overrides_from_args(ctx.args) + (set_ or []), sweep_run_id=sweep_run_id())
    if reference is not None:
        from cl_flat.errors import UserError
        from cl_flat.recipes.reference import run_reference

        if overwrite:
            raise UserError("--overwrite: a reference run keeps nothing to replace; it is refused only when "
                            "complete (remove its folder to run it again)")

        ref = run_reference(cfg, reference)
        if dist.is_main():
            print_matrix(ref.tasks, [("zero_shot", ref.zero_shot), (ref.kind, ref.scores)], {},
                          f"{cfg.metric_label()} (%): {ref.run_dir}")
            typer.echo(f"mean {sum(ref.scores) / len(ref.scores):.2f}; results: {ref.run_dir}")
        dist.shutdown()
        return
    result = run_sequence(cfg, resume=resume, allow_config_change=allow_config_change, overwrite=overwrite)
    if dist.is_main():
        print_matrix(result.tasks, result.rows, result.metrics, f"{cfg.metric_label()} matrix (%): {cfg.run.name}")
        print_probes(result.probes, result.probe_rows, result.metrics, f"probes (%): {cfg.run.name}")
        typer.echo(f"results: {result.run_dir}")
    dist.shutdown()


@app.command(context_settings=OVERRIDE_FORMS)
def validate(ctx: typer.Context, config: Path, set_: SetOption = None) -> None:
    """Check the config and every local data file (never downloads); print the resolved config.
    Takes overrides in every form `train` takes, so a sweep's command line can be checked as it is."""
    import yaml

    from cl_flat.config import config_to_dict
    from cl_flat.overrides import overrides_from_args
    from cl_flat.recipes.validate import validate as validate_config_file

    cfg, notes = validate_config_file(config, overrides_from_args(ctx.args) + (set_ or []))
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"{config}: valid", err=True)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the flatness methods, their parameters, defaults and formulas."""
    from cl_flat.flatness import describe_methods

    described = describe_methods()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    for method in described:
        typer.echo(f"{method['method']}: {method['formula']}")
        typer.echo(f"    {method['summary']}")
        if not method["source"].startswith("cl_flat."):
            typer.echo(f"    from {method['source']}")
        if method["versus_notes"]:
            typer.echo(f"    other write-ups: {method['versus_notes']}")
        for p in method["parameters"]:
            extra = f"  # {p['description']}" if p["description"] else ""
            typer.echo(f"    {p['name']}: {p['type']} = {p['default']!r}{extra}")


@app.command()
def metrics(matrix: Path, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
            per_task_reference: Annotated[Optional[Path], typer.Option(
                "--per-task-reference", help="a --reference per_task run of the sequence: adds FWT_alone")] = None,
            joint_reference: Annotated[Optional[Path], typer.Option(
                "--joint-reference", help="a --reference joint run of the sequence: adds gap_joint")] = None
            ) -> None:
    """Forgetting metrics (AA, BWT, FWT, F, AIA, OP) of an acc_matrix.csv; with reference runs also
    FWT_alone = mean_{i≥2} (R[i,i] − P_i) and gap_joint = mean_i J_i − AA."""
    from cl_flat.recipes.metrics import matrix_metrics

    result = matrix_metrics(matrix, per_task_reference, joint_reference)
    typer.echo(json.dumps(result, indent=2) if as_json else format_metrics(result))


@app.command(name="eval")
def eval_(
    run_dir: Path,
    metric: Annotated[Optional[str], typer.Option("--metric", metavar="accuracy|exact_match|rouge_l",
                                                  help="evaluation.metric to score with (default: the run's; a "
                                                  "task's own metric stays)")] = None,
    max_samples: Annotated[Optional[str], typer.Option("--max-samples", metavar="N|all", help="test examples per "
                                                       "task; all = the full test sets (default: the run's)")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", metavar="T1,T2", help="tasks to score (default: "
                                                 "all)")] = None,
    after: Annotated[Optional[str], typer.Option("--after", metavar="ROW1,ROW2", help="rows: zero_shot and/or "
                                                 "trained tasks, the stack right after each (default: all)")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="output name: eval/<name>.csv and .json "
                                                "(default: <metric>-<max samples>)")] = None,
    set_: SetOption = None,
) -> None:
    """Score a finished run again. Without options: reload the stack after the last task, score every
    task (and probe) with the run's settings and compare with acc_matrix.csv's (and probe_matrix.csv's) last
    row (exit 1 if it differs). With
    any option (--metric, --max-samples, --tasks, --after, --set evaluation.*): score the chosen rows and
    tasks (default: the whole matrix, zero_shot included) and write eval/<name>.csv in acc_matrix.csv's
    format plus eval/<name>.json (settings; AA, BWT, ... for a whole matrix); acc_matrix.csv is never touched."""
    from cl_flat import dist
    from cl_flat.recipes.eval import reevaluate, rescore, rescoring

    def listed(text: Optional[str]) -> Optional[list[str]]:
        return None if text is None else [part.strip() for part in text.split(",") if part.strip()]

    values = {"metric": metric, "max_samples": None if max_samples is None else _integer_or_text(max_samples),
              "tasks": listed(tasks), "after": listed(after), "name": name}
    if rescoring(values, set_ or []):
        result = rescore(run_dir, values, set_ or [])
        if dist.is_main():
            print_matrix(result.tasks, result.rows, result.metrics or {}, f"{run_dir}: re-scored, {result.metric} (%)",
                         digits=2)
            typer.echo(f"saved: {result.csv} {result.record}")
        dist.shutdown()
        return
    result = reevaluate(run_dir)
    is_main = dist.is_main()
    dist.shutdown()
    if is_main:
        print_matrix(result.tasks, [("saved", result.saved), ("reloaded", result.scores)], {},
                      f"{run_dir}: last row", digits=2)
        same = all(a is not None and abs(a - b) < 1e-9 for a, b in zip(result.saved, result.scores))
        typer.echo("reproduced exactly" if same else "DIFFERS from the saved matrix")
        if not same:
            raise typer.Exit(1)


def _integer_or_text(text: str) -> int | str:
    """An integer option value, or the text itself (then refused by the option's validation, named)."""
    try:
        return int(text)
    except ValueError:
        return text


LANDSCAPE_FLAGS = {"dims": "--dims", "points": "--points", "space": "--space", "split": "--split", "rho": "--rho",
                   "samples": "--samples", "ascent_steps": "--ascent-steps", "max_samples": "--max-samples",
                   "task": "--task", "after": "--after", "direction": "--direction"}


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@app.command()
def landscape(
    run_dir: Path,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="override an evaluation.* setting of the run (e.g. "
        "evaluation.hessian_iters=50; repeatable)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="task to measure (default: every trained task, "
                                                "or every task up to --after)")] = None,
    dims: Annotated[int, typer.Option("--dims", metavar="1|2",
                                      help="1: curve along one direction; 2: grid over two")] = 1,
    points: Annotated[int, typer.Option("--points", help="grid points per axis, alpha in [-1, 1]")] = 21,
    space: Annotated[Optional[str], typer.Option("--space", metavar="adapter|merged",
                                                 help="adapter (the task's A, B) or merged (W0 + Σ s·BA); "
                                                 "default: evaluation.sharpness_space")] = None,
    split: Annotated[str, typer.Option("--split", metavar="test|train", help="held-out data: test or train")] = "test",
    after: Annotated[Optional[str], typer.Option("--after", help="use the adapter stack as it was after this "
                                                 "(later) task instead of right after --task")] = None,
    rho: Annotated[Optional[float], typer.Option("--rho", help="sharpness radius, relative: row i of the "
                                                 "moved weights moves by at most rho·‖W_i‖ "
                                                 "(default: evaluation.sharpness_rho)")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="random directions M for sharpness "
                                                   "(default: evaluation.sharpness_samples)")] = None,
    ascent_steps: Annotated[Optional[int], typer.Option("--ascent-steps", help="worst-case gradient-ascent steps, "
                                                        "one forward+backward each (default: "
                                                        "evaluation.sharpness_ascent_steps)")] = None,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="cap on held-out examples "
                                                       "(default: min(evaluation.max_samples_per_task, "
                                                       "evaluation.landscape_max_samples))")] = None,
    direction: Annotated[str, typer.Option("--direction", metavar="random|worst",
                                           help="random: random filter-normalised axes; worst: the first axis is the "
                                                "worst-case sharpness perturbation")] = "random",
) -> None:
    """Loss landscape (1-D/2-D, filter-normalised) and average/worst-case sharpness of a run's tasks:
    landscape/<task>_{1d,2d}.csv, plots/landscape_<task>_*.png, landscape/sharpness.json.
    Directions: each row of a Gaussian direction is rescaled to the norm of W's row (Li et al.'s filter
    normalisation; a Gaussian direction of std σ‖W_i,:‖ differs by a random factor per row), so alpha means the
    same step in every layer and run."""
    from cl_flat.config import validate_options
    from cl_flat.landscape import LandscapeOptions
    from cl_flat.recipes.landscape import landscapes

    values = {"task": task, "after": after, "dims": dims, "points": points, "space": space, "split": split,
              "rho": rho, "samples": samples, "ascent_steps": ascent_steps, "max_samples": max_samples,
              "direction": direction}
    options = validate_options(LandscapeOptions, values, "cl-flat landscape", LANDSCAPE_FLAGS)
    for result in landscapes(run_dir, options, overrides=set_ or []):
        s = result.sharpness
        typer.echo(f"{result.stem} [{s['space']}, {s['split']}, {s['examples']} examples]: loss {s['loss']:.4f}; "
                   f"{dims}-D loss range [{min(result.grid):.4f}, {max(result.grid):.4f}]; sharpness avg "
                   f"{s['avg']:.4g} worst {s['worst']:.4g} (rho {s['rho']:g} per row, M {s['samples']}, "
                   f"{s['ascent_steps']} ascent steps); Hessian lambda_max {_number(s['lambda_max'])} trace "
                   f"{_number(s['trace'])} ± {_number(s['trace_se'])} ({s['hessian_probes']} probes); "
                   f"{result.passes['forward']} forward + {result.passes['forward_backward']} forward+backward passes "
                   f"+ {result.passes['hessian_vector']} Hessian-vector products, {result.seconds:.1f} s")
        typer.echo(f"    {result.csv}  {result.png}")
        typer.echo(f"sharpness: {result.sharpness_json}")


@app.command()
def bench(config: Path, set_: SetOption = None,
          methods: Annotated[Optional[str], typer.Option(help="comma-separated variants (default: all)")] = None,
          updates: Annotated[int, typer.Option(min=1, help="timed updates per variant")] = 5,
          warmup: Annotated[int, typer.Option(min=0, help="untimed updates first")] = 2,
          rounds: Annotated[int, typer.Option(min=1, help="times every variant runs (interleaved); "
                                                       "medians over rounds")] = 1,
          out: Annotated[Path, typer.Option(help="folder for the JSON and markdown table")] = Path("results/bench"),
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the JSON and markdown table of an "
                                                  "earlier bench of this config and device in --out")] = False,
          evaluation: Annotated[bool, typer.Option("--eval/--no-eval", help="also time evaluation (rank "
                                                   "classification and exact match, examples/s)")] = True,
          as_json: Annotated[bool, typer.Option("--json", help="print the JSON result")] = False) -> None:
    """Seconds per update and peak memory of each flatness method vs plain training, and evaluation's
    examples per second."""
    from cl_flat.bench import variants
    from cl_flat.errors import ConfigError, UserError
    from cl_flat.recipes.bench import failed_variants, markdown_table, planned_paths, run_bench, save_bench

    if out.exists() and not out.is_dir():
        raise ConfigError("cl-flat bench", [f"--out: {out} exists and is not a folder"], kind="options")
    json_path, md_path = planned_paths(str(config), out)
    taken = [str(path) for path in (json_path, md_path) if path.exists()]
    if taken and not overwrite:  # e.g. a committed reference table: checked before anything is measured
        raise ConfigError("cl-flat bench", [f"--out: {', '.join(taken)} already exist(s); pass --overwrite to "
                                            "replace, or --out DIR to write elsewhere"], kind="options")
    labels = [m.strip() for m in methods.split(",")] if methods else list(variants())
    # saved after every variant (the last save holds the final result), so an interrupt keeps what was measured
    result = run_bench(str(config), labels, updates, warmup, rounds,
                       on_progress=lambda so_far: save_bench(so_far, out), evaluation=evaluation, overrides=set_ or [])
    typer.echo(json.dumps(result, indent=2) if as_json else markdown_table(result))
    typer.echo(f"saved: {json_path} {md_path}", err=True)
    failures = failed_variants(result)
    if failures:
        raise UserError(f"cl-flat bench: {len(failures)} variant(s) failed: {', '.join(failures)}; the others are "
                        f"saved in {json_path}, each failure's error (its stderr tail) under its name there")


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="run folders, folders of run folders, or globs (quoted globs "
                                                   "are expanded too)")],
    out: Annotated[Path, typer.Option("--out", help="folder for report.md, report.csv and the figures")],
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", help="KEY=VALUE: the group to compare "
                                                          "with, paired by seed (repeatable; default "
                                                          "flatness.method=none when present)")] = None,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="comma-separated dotted keys to group by, "
                                                    "e.g. flatness.method,flatness.scope (default: the whole "
                                                    "config but seed, name, paths, logging)")] = None,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="compare runs of different task sets (runs "
                                              "of the same tasks in other orders are always grouped)")] = False,
    pair_by: Annotated[str, typer.Option("--pair-by", help="pair runs with the baseline's by seed,order (same "
                                         "seed and task order), order, or seed")] = "seed,order",
    flatness_measure: Annotated[str, typer.Option("--flatness-measure", help="sharpness.json field of the "
                                                  "flatness-vs-forgetting figure: auto (lambda_max if present, "
                                                  "else worst), worst, avg, lambda_max, trace")] = "auto",
    published: Annotated[Optional[str], typer.Option("--published", help="add O-LoRA's published T5-large AA "
                                                     "as marked reference rows: standard or long")] = None,
    primary: Annotated[Optional[str], typer.Option("--primary", help="comma-separated measures named before "
                                                   "looking (e.g. BWT or BWT,lambda_max): only their paired "
                                                   "differences form the Holm-adjusted family, the others are "
                                                   "descriptive (default: every measure)")] = None,
) -> None:
    """Compare finished runs: per group (seeds, task orders) n, mean ± 95% t-interval of AA, BWT, FWT, F, AIA
    and the flatness measures saved, paired differences against a baseline, flatness vs forgetting;
    report.md, report.csv and figures."""
    from cl_flat.report import build_report, write_report
    from cl_flat.report.flatness import choose_measure

    result = build_report(runs, group_by=group_by, baseline=baseline or [], allow_mixed=allow_mixed,
                          pair_by=pair_by, published=published, primary=primary)
    choose_measure(result.runs, flatness_measure)  # a bad --flatness-measure stops before anything is written
    written = write_report(result, out, flatness_measure)
    typer.echo((out / "report.md").read_text(encoding="utf-8"), nl=False)
    for path in result.skipped:
        typer.echo(f"skipped (incomplete, no metrics.json): {path}", err=True)
    typer.echo(f"saved: {out / 'report.md'} {out / 'report.csv'} and {len(written) - 2} figures", err=True)


data_app = App(help="Benchmark data for offline runs.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    benchmark: Annotated[str, typer.Argument(help="standard (DBpedia, Amazon, Yahoo, AG News), long (the 15 "
                                                  "tasks of O-LoRA's long sequence) or superni (SAPT's 15 "
                                                  "SuperNI generation tasks)")],
    out: Annotated[Path, typer.Option("--out", help="folder to write <task>/{train,test}.jsonl and prepared.json "
                                      "into (the shipped configs read data/olora, data/superni)")],
    source: Annotated[str, typer.Option("--source", help="hub (download through `datasets`; not for superni) or "
                                        "the path of a local copy of O-LoRA's CL_Benchmark/ folder (SAPT's "
                                        "CL_Benchmark/SuperNI/ for superni)")] = "hub",
    seed: Annotated[int, typer.Option("--seed", min=0, help="seed of the samples drawn from larger splits")] = 42,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out (only once the new "
                                            "preparation is complete)")] = False,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated tasks of the benchmark to prepare "
                                                 "(e.g. agnews,amazon,sst2: a partial CL_Benchmark copy); "
                                                 "default all")] = None,
) -> None:
    """A benchmark as jsonl, sampled as published (O-LoRA's: 1000 training examples per class, the published
    test sizes; SuperNI: SAPT's files whole), written atomically with a prepared.json manifest (sizes, seed,
    sha256 of each file)."""
    from cl_flat.data.prepare import prepare_benchmark, size_against_published

    def report_split(task: str, split: str, rows) -> None:
        dropped = sum(rows.dropped.values())
        note = f" (dropped {dropped} rows with labels outside the task's: {dict(rows.dropped)})" if dropped else ""
        size = size_against_published(task, split, len(rows.pairs))
        typer.echo(f"{task}/{split}.jsonl: {len(rows.pairs)} examples{note}{size}", err=True)

    selected = None if tasks is None else [name.strip() for name in tasks.split(",") if name.strip()]
    manifest = prepare_benchmark(benchmark, out, source, seed=seed, overwrite=overwrite, progress=report_split,
                                 tasks=selected)
    typer.echo(f"{out}: {benchmark} benchmark, {len(manifest['tasks'])} tasks, manifest {out / 'prepared.json'}")


def main() -> None:
    quiet_libraries()
    run_to_exit(lambda: app(prog_name="cl-flat"))  # also under `python -m cl_flat.cli`


if __name__ == "__main__":
    main()

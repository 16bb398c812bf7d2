"""Malformed input to eval, landscape, metrics, bench and validate, one test per class: exit code 2, one
short message naming the file (file:line) or the flag, no traceback, and nothing written (the folder's
listing and mtimes are unchanged)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cl_flat import __version__
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import require_run
from helpers import assert_clean_failure, run_cli, unchanged, write_jsonl_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, finished run folder) of the smallest 2-task run, trained once."""
    base = tmp_path_factory.mktemp("trained")
    raw = {"run": {"name": "tiny", "output_dir": str(base / "results"), "seed": 1},
           "model": {"name_or_path": "tiny-random:llama"},
           "lora": {"r": 2, "target_modules": ["q_proj"]},
           "tasks": [write_jsonl_task(base / "data", "t1", ["yes", "no"], 4, 4),
                     write_jsonl_task(base / "data", "t2", ["red", "blue"], 4, 4)],
           "training": {"micro_batch_size": 2, "max_steps": 1},
           "evaluation": {"max_samples_per_task": 4, "batch_size": 4, "sharpness": False},
           "logging": {"progress": False, "wandb": {"mode": "disabled"}}}
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_cli(["train", str(config)], cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, base / "results" / "tiny"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the finished run, free to break."""
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def refused(args: list[str], cwd: Path, *needles: str) -> None:
    """`cl-flat ARGS` in `cwd` exits 2 with a short message (at most 4 lines) holding every needle, and
    creates or touches nothing under `cwd`."""
    with unchanged(cwd):
        assert_clean_failure(run_cli(args, cwd=cwd, timeout=300), *needles, code=2, max_lines=4)


def test_missing_or_non_run_folder(run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    absent = tmp_path / "absent"
    refused(["eval", str(absent)], tmp_path, f"{absent}: run folder not found")
    refused(["landscape", str(plain)], tmp_path, f"{plain}: not a cl-flat run folder (config.yaml is missing)")
    refused(["eval", str(run / "acc_matrix.csv")], tmp_path, f"{run / 'acc_matrix.csv'}: not a folder")
    refused(["metrics", str(tmp_path / "absent.csv")], tmp_path, f"{tmp_path / 'absent.csv'}: file not found")
    refused(["metrics", str(run)], tmp_path, f"{run}: a folder, not a csv file")
    refused(["validate", str(tmp_path / "absent.yaml")], tmp_path, f"{tmp_path / 'absent.yaml'}: file not found")


def test_run_folder_of_another_results_format(run, tmp_path):
    document = yaml.safe_load((run / "config.yaml").read_text())
    assert document["meta"]["results_format"] == RunDir.RESULTS_FORMAT == 1  # train records it
    document["meta"]["results_format"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    refused(["eval", str(run)], tmp_path, f"{run / 'config.yaml'}: results format 2", f"cl-flat {__version__}",
            "reads format 1", "train the run again")
    # a folder from before the field (no results_format) is format 1: read without complaint
    del document["meta"]["results_format"]
    (run / "config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    assert require_run(RunDir(run)).trained == ["t1", "t2"]


def test_missing_adapter(run, tmp_path):
    (run / "adapters" / "t2" / "adapter_model.safetensors").unlink()
    refused(["eval", str(run)], tmp_path,
            f"{run / 'adapters' / 't2'}: the adapter of task 't2' is missing (no adapter_model.safetensors)")
    shutil.rmtree(run / "adapters" / "t1")
    refused(["landscape", str(run), "--task", "t1"], tmp_path,
            f"{run / 'adapters' / 't1'}: the adapter of task 't1' is missing (no such folder)")


def test_truncated_or_non_numeric_acc_matrix(run, tmp_path):
    matrix = run / "acc_matrix.csv"
    lines = matrix.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["after_task", "zero_shot", "t1", "t2"]
    matrix.write_text("\n".join(lines[:3]) + "\nt2,50")  # cut in line 4
    refused(["eval", str(run)], tmp_path, f"{matrix}:4: expected 3 columns")
    matrix.write_text("\n".join([lines[0], lines[1], "t1,n/a,50.0", lines[3]]) + "\n")
    refused(["landscape", str(run)], tmp_path, f"{matrix}:3: column 't1'", "'n/a'")
    hand_made = tmp_path / "m.csv"
    hand_made.write_text("after_task,a,b\na,70,\nb,,90\n")  # R[2,1] missing: every metric needs it
    refused(["metrics", str(hand_made)], tmp_path, f"{hand_made}:3: no score for 'a'")
    hand_made.write_bytes(b"after_task,a\na,7\xff0\n")
    refused(["metrics", str(hand_made)], tmp_path, f"{hand_made}:2: not UTF-8 text")


def test_unknown_task_name(run, tmp_path):
    refused(["landscape", str(run), "--task", "t9", "--after", "t8"], tmp_path,
            "--task 't9': unknown task; the run's tasks are ['t1', 't2']",
            "--after 't8': unknown task; the run's tasks are ['t1', 't2']")


def test_out_of_range_flags(trained, run, tmp_path):
    config = trained[0]
    refused(["landscape", str(run), "--dims", "3", "--points", "1", "--rho", "-0.5"], tmp_path,
            "--dims: Input should be 1 or 2", "--points: Input should be greater than or equal to 2",
            "--rho: Input should be greater than 0")
    refused(["bench", str(config), "--methods", "sam,magic", "--out", str(tmp_path / "bench")], tmp_path,
            "--methods: unknown variant(s) ['magic']; available: ['none'")
    refused(["bench", str(config), "--out", str(run / "acc_matrix.csv")], tmp_path,
            f"--out: {run / 'acc_matrix.csv'} exists and is not a folder")
    refused(["validate", str(config), "--set", "lora.r=0"], tmp_path, "lora.r: Input should be greater than")
    with unchanged(tmp_path):
        proc = run_cli(["bench", str(config), "--rounds", "0"], cwd=tmp_path)  # typer's own range check
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "'--rounds'" in proc.stderr and "greater than or equal to 1" in proc.stderr, proc.stderr

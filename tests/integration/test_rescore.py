"""`cl-flat eval RUN --metric/--max-samples/--tasks/--after/--set evaluation.*`: the chosen rows and tasks
scored again into eval/<name>.csv (+ .json), acc_matrix.csv and metrics.json untouched."""

from __future__ import annotations

import json

import pytest
import yaml

from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.metrics import compute_metrics
from helpers import assert_clean_failure, one_task_config, run_cli, unchanged, write_jsonl_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-task run on tiny-random:llama, scored by accuracy on 4 of the 6 test examples."""
    folder = tmp_path_factory.mktemp("rescore")
    config = one_task_config(folder, "two", n_test=6)
    raw = yaml.safe_load(config.read_text())
    raw["tasks"].append(write_jsonl_task(folder / "data", "t2", ["left", "right"], 4, 6))
    config.write_text(yaml.safe_dump(raw))
    proc = run_cli(["train", str(config)], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, folder / "results" / "two"


def test_the_same_settings_give_back_the_saved_matrix(trained):
    folder, run = trained
    saved = {name: (run / name).read_bytes() for name in ("acc_matrix.csv", "metrics.json", "config.yaml")}
    proc = run_cli(["eval", str(run), "--metric", "accuracy", "--name", "again"], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert (run / "eval" / "again.csv").read_text() == saved["acc_matrix.csv"].decode()
    record = json.loads((run / "eval" / "again.json").read_text())
    stored = json.loads(saved["metrics.json"])
    assert {key: record["metrics"][key] for key in ("AA", "BWT", "FWT", "F", "AIA", "OP")} == \
        {key: stored[key] for key in ("AA", "BWT", "FWT", "F", "AIA", "OP")}
    assert record["max_samples_per_task"] == 4 and record["rows"] == ["zero_shot", "t1", "t2"]


def test_exact_match_on_the_full_test_sets(trained):
    folder, run = trained
    proc = run_cli(["eval", str(run), "--metric", "exact_match", "--max-samples", "all"], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, rows, zero_shot = read_acc_matrix(run / "eval" / "exact_match-all.csv")
    assert names == ["t1", "t2"] and len(rows) == 2 and zero_shot is not None
    scores = [s for row in [zero_shot, *rows] for s in row]
    assert all(round(s * 6 / 100, 6).is_integer() for s in scores)  # 6 examples per task: multiples of 1/6
    record = json.loads((run / "eval" / "exact_match-all.json").read_text())
    assert record["metric"] == "exact_match" and record["max_samples_per_task"] is None
    assert record["metrics"] == compute_metrics(rows, zero_shot)


def test_one_cell_and_an_evaluation_override(trained):
    folder, run = trained
    proc = run_cli(["eval", str(run), "--tasks", "t1", "--after", "t2", "--set", "evaluation.batch_size=1"],
                   cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run / "eval" / "accuracy-4.csv").read_text().splitlines()
    assert lines[0] == "after_task,t1" and lines[1].startswith("t2,") and len(lines) == 2
    saved = (run / "acc_matrix.csv").read_text().splitlines()[3].split(",")[1]
    assert lines[1] == f"t2,{saved}"  # batch size changes nothing in the scores
    assert json.loads((run / "eval" / "accuracy-4.json").read_text())["metrics"] is None


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "nope"], "--tasks: 'nope' not among the run's tasks ['t1', 't2']"),
    (["--after", "t3"], "--after: 't3' not among the rows"),
    (["--max-samples", "0"], "--max-samples"),
    (["--metric", "bleu"], "--metric"),
    (["--set", "training.learning_rate=1"], "--set training.learning_rate: only evaluation.* settings"),
    (["--name", "../x"], "--name"),
])
def test_bad_options_are_named(trained, args, needle):
    folder, run = trained
    with unchanged(run):
        assert_clean_failure(run_cli(["eval", str(run), *args], cwd=folder), needle, code=2)

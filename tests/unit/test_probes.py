"""Probe tasks (`probes:`): scored at zero-shot and after every task, never trained. The drift numbers
below are worked out by hand from the scores written next to them; the config rules are docs/configuration.md's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_flat.config import load_config, validate_config
from cl_flat.errors import ConfigError, MatrixFormatError
from cl_flat.matrix_csv import read_probe_matrix, write_acc_matrix
from cl_flat.metrics import ZERO_SHOT, probe_drift, probe_metrics
from cl_flat.rundir import RunDir


def raw(**extra) -> dict:
    return {"model": {"name_or_path": "tiny-random:llama"},
            "tasks": [{"name": "alpha", "source": "builtin"}, {"name": "beta", "source": "builtin"}], **extra}


def problems_of(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return info.value.problems


# ---------------------------------------------------------------- drift (hand numbers)

def test_drift_is_each_row_minus_zero_shot():
    # s0 = 50; after tasks 1..3: 55, 40, 42.5 -> drift 5, -10, -7.5
    entry = probe_drift(50.0, [55.0, 40.0, 42.5])
    assert entry == {"zero_shot": 50.0, "after_each_task": [55.0, 40.0, 42.5], "drift": [5.0, -10.0, -7.5],
                     "final_drift": -7.5}


def test_a_missing_score_leaves_its_drift_undefined():
    assert probe_drift(None, [60.0])["drift"] == [None]
    entry = probe_drift(30.0, [None, 20.0])
    assert entry["drift"] == [None, -10.0] and entry["final_drift"] == -10.0
    assert probe_drift(30.0, [25.0, float("nan")])["final_drift"] is None


def test_mean_final_drift_over_probes():
    # probe p: 40 -> 45 -> 30 (final drift -10); probe q: 80 -> 70 -> 86 (final drift +6); mean -2
    out = probe_metrics(["p", "q"], [40.0, 80.0], [[45.0, 70.0], [30.0, 86.0]])
    assert out["probes"]["p"]["drift"] == [5.0, -10.0] and out["probes"]["q"]["drift"] == [-10.0, 6.0]
    assert out["probes"]["q"]["after_each_task"] == [70.0, 86.0]
    assert out["mean_final_drift"] == -2.0
    assert probe_metrics(["p", "q"], [40.0, None], [[45.0, 70.0]])["mean_final_drift"] is None
    assert probe_metrics([], [], [[]])["mean_final_drift"] is None


# ---------------------------------------------------------------- config

def test_a_probe_is_a_task_config_and_defaults_to_none():
    assert validate_config(raw()).probes == []
    config = validate_config(raw(probes=[{"name": "gamma", "source": "builtin", "task": "complaint_aspect"}]))
    assert [p.name for p in config.probes] == ["gamma"] and config.probes[0].task == "complaint_aspect"


def test_a_probe_named_like_a_task_or_another_probe_is_refused():
    problems = problems_of(raw(probes=[{"name": "beta", "source": "builtin"}, {"name": "g", "source": "builtin"},
                                       {"name": "g", "source": "builtin"}]))
    assert any(p.startswith("probes.0.name:") and "'beta'" in p and "task" in p for p in problems), problems
    assert any(p.startswith("probes.2.name:") and "'g'" in p and "probe" in p for p in problems), problems
    assert not any(p.startswith("probes.1.") for p in problems)


@pytest.mark.parametrize("key, value", [("training", {"epochs": 2}), ("flatness", {"method": "sam"}),
                                        ("lora", {"lambda_orth": 0.1}), ("max_train_samples", 4)])
def test_training_keys_on_a_probe_are_refused(key, value):
    problems = problems_of(raw(probes=[{"name": "g", "source": "builtin", key: value}]))
    assert any(p.startswith(f"probes.0.{key}:") and "never trained" in p for p in problems), problems


def test_a_probe_is_checked_by_the_task_schema():
    problems = problems_of(raw(probes=[{"name": "g", "source": "builtin", "n_test": 0},
                                       {"name": "h", "source": "jsonl", "train": "a", "test": "b"}]))
    assert any(p.startswith("probes.0.n_test:") for p in problems), problems
    assert any(p.startswith("probes.1.labels:") and "accuracy" in p for p in problems), problems


def test_probe_data_paths_resolve_like_task_paths(tmp_path: Path):
    (tmp_path / "p_test.jsonl").write_text('{"input": "x", "output": "y"}\n')
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: tiny-random:llama}\ntasks: [{name: a, source: builtin}]\n"
                    "probes: [{name: p, source: jsonl, train: p_test.jsonl, test: p_test.jsonl,"
                    " metric: exact_match}]\n")
    probe = load_config(path).probes[0]
    assert probe.test == (tmp_path / "p_test.jsonl").resolve()


# ---------------------------------------------------------------- probe_matrix.csv

def test_probe_matrix_round_trip_and_restored_rows(tmp_path: Path):
    run_dir = RunDir(tmp_path)
    rows = [(ZERO_SHOT, [50.0, None]), ("t1", [25.0, 75.0]), ("t2", [12.5, 100.0])]
    run_dir.write_matrix(["t1", "t2"], [(ZERO_SHOT, [1.0, 2.0]), ("t1", [3.0, 4.0]), ("t2", [5.0, 6.0])],
                         ["p", "q"], rows)
    assert run_dir.probe_matrix_path.read_text().splitlines() == [
        "after_task,p,q", "zero_shot,50.0,", "t1,25.0,75.0", "t2,12.5,100.0"]
    assert read_probe_matrix(run_dir.probe_matrix_path) == (["p", "q"], rows)
    # --resume keeps the rows acc_matrix.csv kept (the file may be a row ahead); a probe added later: None
    assert run_dir.restored_probe_rows(["q", "new"], [ZERO_SHOT, "t1"]) == [(ZERO_SHOT, [None, None]),
                                                                           ("t1", [75.0, None])]
    assert run_dir.restored_probe_rows([], [ZERO_SHOT]) == []


def test_a_run_without_probes_writes_no_probe_matrix(tmp_path: Path):
    RunDir(tmp_path).write_matrix(["t1"], [(ZERO_SHOT, [1.0])])
    assert not RunDir(tmp_path).probe_matrix_path.exists() and RunDir(tmp_path).matrix_path.is_file()


def test_a_malformed_probe_matrix_names_its_line(tmp_path: Path):
    path = tmp_path / "probe_matrix.csv"
    write_acc_matrix(path, ["p"], [(ZERO_SHOT, [1.0])])
    path.write_text(path.read_text() + "t1,1.0,2.0\n")
    with pytest.raises(MatrixFormatError, match=r"probe_matrix.csv:3: expected 2 columns"):
        read_probe_matrix(path)
    path.write_text("after_task,p\nt1,abc\n")
    with pytest.raises(MatrixFormatError, match=r":2: .*'abc'"):
        read_probe_matrix(path)


def probe_run(folder: Path, probe: str) -> Path:
    """run.yaml in `folder`: one builtin task on tiny-random:llama and the probe given as a YAML flow mapping."""
    path = folder / "run.yaml"
    path.write_text(f"run: {{output_dir: {folder / 'results'}}}\nmodel: {{name_or_path: tiny-random:llama}}\n"
                    f"tasks: [{{name: food_sentiment, source: builtin}}]\nprobes: [{probe}]\n")
    return path


def test_validate_checks_probe_data_like_task_data(tmp_path: Path):
    from cl_flat.errors import DataError
    from cl_flat.recipes.validate import validate

    (tmp_path / "p.jsonl").write_text('{"input": "x", "output": "y"}\n{"input": 3}\n')
    path = probe_run(tmp_path, "{name: p, source: jsonl, train: p.jsonl, test: p.jsonl, metric: exact_match}")
    with pytest.raises(DataError, match=r"p.jsonl:2: no field \"output\""):
        validate(path, [])
    (tmp_path / "p.jsonl").write_text('{"input": "x", "output": "y"}\n')
    config, _ = validate(path, [])
    assert [p.name for p in config.probes] == ["p"]


def test_a_jsonl_probe_needs_no_training_file_but_a_task_does(tmp_path: Path):
    """A probe is never trained: its `train` may be left out (nothing is read for it); a task's may not."""
    from cl_flat.data import load_task
    from cl_flat.data.fingerprints import local_files
    from cl_flat.recipes.validate import validate

    (tmp_path / "p.jsonl").write_text('{"input": "x", "output": "y"}\n{"input": "z", "output": "w"}\n')
    path = probe_run(tmp_path, "{name: p, source: jsonl, test: p.jsonl, metric: exact_match}")
    config, _ = validate(path, [])
    probe = config.probes[0]
    assert probe.train is None and probe.test == (tmp_path / "p.jsonl").resolve()
    data = load_task(probe, config.run.seed, config.evaluation.metric)
    assert data.train == () and [e.output for e in data.test] == ["y", "w"]
    assert local_files(config) == [probe.test]
    problems = problems_of(raw(tasks=[{"name": "a", "source": "jsonl", "test": "a.jsonl", "labels": ["x", "y"]}]))
    assert problems == ["tasks.0.train: a trained task needs its training file (only a probe may omit it)"]

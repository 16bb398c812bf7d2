"""The CLI on bad inputs, in this process: one clear message on stderr naming the field or file:line, a
non-zero exit (2 for config-schema errors), never a traceback. Plus a valid config and `cl-flat metrics` on
a hand-made matrix. `cli_here` (conftest) calls the real `main()`; the refusals that need the entry point in
a subprocess (train, malformed YAML) are in tests/integration/test_cli_refusals.py."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import assert_clean_failure, write_yaml

# ---------------------------------------------------------------- validate: good config


def test_good_config_validates_and_prints_the_resolved_yaml(project, cli_here):
    tmp_path, raw = project
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw)), "--set",
                       "training.learning_rate=5e-4"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["run"]["name"] == "clitest"
    assert resolved["lora"]["r"] == 4
    assert resolved["tasks"][0]["name"] == "senti"
    assert resolved["training"]["learning_rate"] == pytest.approx(5e-4)  # the override
    assert resolved["training"]["max_steps"] == 1
    # defaults filled in (the README's example values)
    assert resolved["evaluation"]["metric"] == "accuracy"
    assert resolved["flatness"] == {"method": "none"}
    assert resolved["training"]["gradient_accumulation_steps"] >= 1


# ---------------------------------------------------------------- validate: schema errors (exit 2)


def test_validate_unknown_key(project, cli_here):
    tmp_path, raw = project
    raw["training"]["learning_rte"] = 1e-3
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "training.learning_rte", code=2)


def test_validate_wrong_type(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["r"] = "four"
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "lora.r", code=2)


def test_validate_unknown_method(project, cli_here):
    tmp_path, raw = project
    raw["flatness"] = {"method": "magic"}
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "flatness", "magic", "sam", code=2)


def test_validate_duplicate_task_names(project, cli_here):
    tmp_path, raw = project
    raw["tasks"].append(dict(raw["tasks"][0]))
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "tasks", "senti", code=2)


def test_validate_several_errors_at_once(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["r"] = 0
    raw["training"]["warmup_ratio"] = 1.5
    raw["colour"] = "blue"
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "lora.r", "training.warmup_ratio", "colour", code=2)


def test_validate_bad_override_syntax(project, cli_here):
    tmp_path, raw = project
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw)), "--set", "foo"], tmp_path)
    assert_clean_failure(result, "foo", code=2)


# ---------------------------------------------------------------- validate: data errors


def test_validate_missing_jsonl_file(project, cli_here):
    tmp_path, raw = project
    raw["tasks"][0]["test"] = "absent.jsonl"
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "absent.jsonl")


def test_validate_malformed_jsonl_names_file_and_line(project, cli_here):
    tmp_path, raw = project
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "a", "output": "pos"}) + "\n"
                   + json.dumps({"input": "b", "output": "neg"}) + "\n"
                   + '{"input": "c", "output": "pos"\n')  # line 3: unterminated object
    raw["tasks"][0]["train"] = str(bad)
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, f"{bad}:3")


def test_validate_bad_target_module(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["target_modules"] = ["not_a_module"]
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "lora.target_modules", "not_a_module")


# ---------------------------------------------------------------- metrics


MATRIX = """after_task,a,b,c
zero_shot,50,40,30
a,60,45,35
b,65,80,46
c,50,70,90
"""
# AA  = (50 + 70 + 90)/3 = 70
# BWT = ((50 - 60) + (70 - 80))/2 = -10
# F   = ((max(60, 65) - 50) + (80 - 70))/2 = (15 + 10)/2 = 12.5
# FWT = ((R[1,2] - b2) + (R[2,3] - b3))/2 = ((45 - 40) + (46 - 30))/2 = 10.5
# OP  = [60, (65 + 80)/2, 70] = [60, 72.5, 70];  AIA = 202.5/3 = 67.5


def test_metrics_json_of_a_hand_made_matrix(tmp_path, cli_here):
    path = tmp_path / "acc_matrix.csv"
    path.write_text(MATRIX)
    result = cli_here(["metrics", str(path), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["AA"] == pytest.approx(70.0)
    assert values["BWT"] == pytest.approx(-10.0)
    assert values["F"] == pytest.approx(12.5)
    assert values["FWT"] == pytest.approx(10.5)
    assert values["AIA"] == pytest.approx(67.5)
    assert values["OP"] == pytest.approx([60.0, 72.5, 70.0])


def test_metrics_on_a_malformed_csv(tmp_path, cli_here):
    path = tmp_path / "bad.csv"
    path.write_text("after_task,a,b\na,50,10\nb,40\n")  # line 3 has 2 columns, expected 3
    result = cli_here(["metrics", str(path)], tmp_path)
    assert_clean_failure(result, f"{path}:3")


# ---------------------------------------------------------------- conventions


def test_validate_takes_the_override_forms_train_takes(project, cli_here):
    tmp_path, raw = project
    config = str(write_yaml(tmp_path / "run.yaml", raw))
    for forms in (["--training.learning_rate=5e-4"], ["--training.learning_rate", "5e-4"],
                  ["training.learning_rate=5e-4"]):
        result = cli_here(["validate", config, *forms], tmp_path)
        assert result.returncode == 0, (forms, result.stderr)
        assert yaml.safe_load(result.stdout)["training"]["learning_rate"] == pytest.approx(5e-4), forms


def test_short_help_version_and_plain_usage(cli_here, tmp_path):
    from cl_flat import __version__

    assert cli_here(["--version"], tmp_path).stdout == f"cl-flat {__version__}\n"
    for command, usage in ((["train"], "Usage: cl-flat train [OPTIONS] CONFIG\n"),
                           (["report"], "Usage: cl-flat report [OPTIONS] RUNS...\n"),
                           (["data", "prepare"], "Usage: cl-flat data prepare [OPTIONS] BENCHMARK\n")):
        result = cli_here([*command, "-h"], tmp_path)
        assert result.returncode == 0 and result.stdout.startswith(usage), result.stdout[:200]
        assert "<bool>" not in result.stdout and "{" not in result.stdout.splitlines()[0]
    landscape = cli_here(["landscape", "-h"], tmp_path).stdout
    assert all(choices in landscape for choices in ("--space adapter|merged", "--split test|train",
                                                     "--direction random|worst", "--dims 1|2"))
    assert "R[i,i]" in cli_here(["metrics", "-h"], tmp_path).stdout  # no markup eats the brackets

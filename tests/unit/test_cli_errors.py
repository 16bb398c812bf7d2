"""The CLI on bad inputs: one clear message on stderr naming the field or file:line, a non-zero
exit (2 for config-schema errors), never a traceback, and for `train` no completed run left
behind. Plus a valid config and `cl-flat metrics` on a hand-made matrix. `cli` runs the real
entry point in a subprocess (the train failures and the malformed YAML: what a user's shell sees);
`cli_here` calls the same `main()` in this process (a traceback would escape it as an exception),
which spares the validate and metrics cases a Python start each."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import quiet_env


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = quiet_env()
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return subprocess.run([sys.executable, "-m", "cl_flat.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_here(capfd, monkeypatch):
    """`cl-flat ARGS` through cl_flat.cli.main in this process, run in `cwd`."""
    from cl_flat.cli import main

    for name in ("TOKENIZERS_PARALLELISM", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):  # main() sets them
        monkeypatch.setenv(name, "false" if name == "TOKENIZERS_PARALLELISM" else "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(args: list[str], cwd: Path) -> Outcome:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["cl-flat", *args])
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capfd.readouterr()
        code = exit_info.value.code
        return Outcome(code if isinstance(code, int) else (0 if code is None else 1), out, err)

    return run


def assert_clean_failure(result: subprocess.CompletedProcess | Outcome, *needles: str, code: int | None = None) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    if code is not None:
        assert result.returncode == code, (result.returncode, output)
    assert "Traceback" not in output, output
    assert "error" in result.stderr.lower(), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in rows))
    return path


@pytest.fixture
def project(tmp_path: Path):
    """A small valid config in tmp_path (relative data paths, output under tmp_path)."""
    rows = [("good one", "pos"), ("bad one", "neg"), ("good two", "pos"), ("bad two", "neg")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    raw = {
        "run": {"name": "clitest", "output_dir": str(tmp_path / "results"), "seed": 3},
        "model": {"name_or_path": "tiny-random:llama"},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "tasks": [{"name": "senti", "source": "jsonl", "train": "train.jsonl", "test": "test.jsonl",
                   "labels": ["pos", "neg"]}],
        "training": {"max_steps": 1, "micro_batch_size": 2},
        "evaluation": {"max_samples_per_task": 2, "batch_size": 4},
        "logging": {"progress": False},
    }
    return tmp_path, raw


def save(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def no_complete_run(tmp_path: Path, raw: dict) -> None:
    run_dir = tmp_path / "results" / raw["run"]["name"]
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "acc_matrix.csv").exists()


# ---------------------------------------------------------------- validate: good config


def test_good_config_validates_and_prints_the_resolved_yaml(project, cli_here):
    tmp_path, raw = project
    result = cli_here(["validate", str(save(tmp_path, raw)), "--set", "training.learning_rate=5e-4"], tmp_path)
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
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "training.learning_rte", code=2)


def test_validate_wrong_type(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["r"] = "four"
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "lora.r", code=2)


def test_validate_unknown_method(project, cli_here):
    tmp_path, raw = project
    raw["flatness"] = {"method": "magic"}
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "flatness", "magic", "sam", code=2)



def test_validate_duplicate_task_names(project, cli_here):
    tmp_path, raw = project
    raw["tasks"].append(dict(raw["tasks"][0]))
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "tasks", "senti", code=2)


def test_validate_several_errors_at_once(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["r"] = 0
    raw["training"]["warmup_ratio"] = 1.5
    raw["colour"] = "blue"
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "lora.r", "training.warmup_ratio", "colour", code=2)


def test_validate_bad_override_syntax(project, cli_here):
    tmp_path, raw = project
    result = cli_here(["validate", str(save(tmp_path, raw)), "--set", "foo"], tmp_path)
    assert_clean_failure(result, "foo", code=2)


def test_validate_malformed_yaml_names_file_and_line(project):
    tmp_path, _ = project
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: a\n bad: 1\n")  # line 3 breaks the block mapping
    result = cli(["validate", str(path)], tmp_path)
    assert_clean_failure(result, f"{path}:3", code=2)


# ---------------------------------------------------------------- validate: data errors


def test_validate_missing_jsonl_file(project, cli_here):
    tmp_path, raw = project
    raw["tasks"][0]["test"] = "absent.jsonl"
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "absent.jsonl")


def test_validate_malformed_jsonl_names_file_and_line(project, cli_here):
    tmp_path, raw = project
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "a", "output": "pos"}) + "\n"
                   + json.dumps({"input": "b", "output": "neg"}) + "\n"
                   + '{"input": "c", "output": "pos"\n')  # line 3: unterminated object
    raw["tasks"][0]["train"] = str(bad)
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, f"{bad}:3")


def test_validate_bad_target_module(project, cli_here):
    tmp_path, raw = project
    raw["lora"]["target_modules"] = ["not_a_module"]
    result = cli_here(["validate", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "lora.target_modules", "not_a_module")


# ---------------------------------------------------------------- train: fails before any result


def test_train_missing_data_file(project):
    tmp_path, raw = project
    raw["tasks"][0]["train"] = "absent.jsonl"
    result = cli(["train", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "absent.jsonl")
    no_complete_run(tmp_path, raw)


def test_train_bad_target_module(project):
    tmp_path, raw = project
    raw["lora"]["target_modules"] = ["not_a_module"]
    result = cli(["train", str(save(tmp_path, raw))], tmp_path)
    assert_clean_failure(result, "lora.target_modules", "not_a_module")
    no_complete_run(tmp_path, raw)



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

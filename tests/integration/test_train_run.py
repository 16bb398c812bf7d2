"""`cl-flat train` end to end on a tiny model: the results contract in 1 process and in
2 processes (torchrun, gloo) for ZeRO 0/1/2; `cl-flat eval` reproduces the last row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli

pytestmark = pytest.mark.integration


def check_results_contract(run_dir: Path, tasks: list[str], world: int, global_batch: int) -> None:
    rows = list(csv.reader((run_dir / "acc_matrix.csv").open()))
    assert rows[0] == ["after_task", *tasks]
    assert [r[0] for r in rows[1:]] == ["zero_shot", *tasks]
    assert all(0.0 <= float(v) <= 100.0 for r in rows[1:] for v in r[1:])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"AA", "BWT", "FWT", "F", "AIA", "OP"}
    assert len(metrics["OP"]) == len(tasks)
    # AA is the mean of the last row, recomputed here from the csv
    last = [float(v) for v in rows[-1][1:]]
    assert metrics["AA"] == pytest.approx(sum(last) / len(last))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["meta"]["world_size"] == world
    assert saved["meta"]["global_batch"] == global_batch
    assert {"torch", "deepspeed", "peft", "transformers"} <= set(saved["meta"]["versions"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in tasks for s in (1, 2, 3)]
    assert all(r["loss"] > 0 for r in log)
    for task in tasks:
        assert (run_dir / "adapters" / task / "adapter_model.safetensors").is_file()
    for plot in ("acc_matrix.png", "op_curve.png", "learning_curves.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG"


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_single_process_run_and_eval(tmp_path, tiny_config):
    tiny_config["logging"]["wandb"] = {"mode": "offline"}
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    check_results_contract(run_dir, ["t1", "t2"], world=1, global_batch=8)
    assert list(run_dir.glob("wandb/offline-run-*")), "wandb offline run folder missing"
    proc = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "reproduced exactly" in proc.stdout
    # a second run with the same name refuses instead of overwriting a complete run
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode != 0 and "already holds a complete run" in proc.stderr


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_process_run(tmp_path, tiny_config, zero):
    tiny_config["deepspeed"]["zero_stage"] = zero
    tiny_config["training"]["micro_batch_size"] = 2  # global batch 2 × 2 × 2 = 8, as in 1 process
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_results_contract(tmp_path / "results" / "tiny", ["t1", "t2"], world=2, global_batch=8)
    # the flatness measures (on by default) are collectives over the sharded held-out sample
    flatness = json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())["sharpness"]
    assert all(entry["lambda_max"] > 0 and entry["trace"] is not None for entry in flatness.values())


def test_seqlora_run(tmp_path, tiny_config):
    tiny_config["lora"]["strategy"] = "seqlora"
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    check_results_contract(run_dir, ["t1", "t2"], world=1, global_batch=8)
    proc = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert "reproduced exactly" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_resume_gives_the_uninterrupted_matrix(tmp_path, tiny_config):
    path = write_config(tmp_path, tiny_config)
    assert run_cli(["train", str(path)], cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "results" / "tiny"
    full = (run_dir / "acc_matrix.csv").read_text().splitlines()
    # Leave the folder as an interruption during task 2 would: t2's adapter, row and metrics gone,
    # a partial t2 log line kept.
    (run_dir / "metrics.json").unlink()
    (run_dir / "acc_matrix.csv").write_text("\n".join(full[:3]) + "\n")
    import shutil

    shutil.rmtree(run_dir / "adapters" / "t2")
    log = (run_dir / "train_log.jsonl").read_text().splitlines()
    (run_dir / "train_log.jsonl").write_text("\n".join(log[:4]) + "\n")

    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode != 0 and "--resume" in proc.stderr
    proc = run_cli(["train", str(path), "--resume"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "acc_matrix.csv").read_text().splitlines() == full
    resumed_log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in resumed_log] == [(t, s) for t in ("t1", "t2") for s in (1, 2, 3)]
    assert [r["loss"] for r in resumed_log] == pytest.approx([json.loads(x)["loss"] for x in log], abs=1e-6)
    # a changed config is refused
    (run_dir / "metrics.json").unlink()
    proc = run_cli(["train", str(path), "--resume", "--set", "training.learning_rate=0.5"], cwd=tmp_path)
    assert proc.returncode != 0 and "differs" in proc.stderr


def test_flatness_after_each_task_lands_in_metrics(tmp_path, tiny_config):
    """By default every task's flatness is measured right after it is trained: sharpness and the
    Hessian's λ_max and trace, in landscape/sharpness.json and metrics.json; with
    sharpness_every_task also every earlier task's (key <task>_after_<later>) and sharpness_matrix.csv."""
    assert "sharpness" not in tiny_config["evaluation"]  # the default
    tiny_config["evaluation"]["sharpness_every_task"] = True
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["sharpness"]) == {"t1", "t2"}
    for record in metrics["sharpness"].values():
        assert record["worst"] >= record["avg"] - 1e-12 and record["rho"] == 0.05 and record["samples"] == 8
        assert record["hessian_iters"] == 20 and record["hessian_probes"] == 8 and record["space"] == "adapter"
        assert record["lambda_max"] > 0 and record["trace"] is not None and record["trace_se"] >= 0
        assert record["passes"]["hessian_vector"] == record["power_iterations"] + 8
    saved = json.loads((run_dir / "landscape" / "sharpness.json").read_text())
    assert set(saved) == {"t1", "t2", "t1_after_t2"} and saved["t1_after_t2"]["after"] == "t2"
    assert {k: saved[k] for k in ("t1", "t2")} == metrics["sharpness"]
    rows = list(csv.DictReader((run_dir / "sharpness_matrix.csv").open()))
    assert [(r["after_task"], r["task"]) for r in rows] == [("t1", "t1"), ("t2", "t1"), ("t2", "t2")]
    for row, key in zip(rows, ("t1", "t1_after_t2", "t2")):
        assert float(row["lambda_max"]) == saved[key]["lambda_max"] and float(row["avg"]) == saved[key]["avg"]


def test_the_same_config_and_seed_twice_gives_identical_results(tmp_path, tiny_config):
    """CPU runs are deterministic: LoRA dropout (torch's global generator, seeded per update) and
    RWP noise (keyed) draw the same values in a second run, so matrix and log match exactly."""
    tiny_config["lora"]["dropout"] = 0.1
    tiny_config["flatness"] = {"method": "rwp", "noise_std": 0.05}
    path = write_config(tmp_path, tiny_config)
    outcomes = []
    for name in ("first", "second"):
        proc = run_cli(["train", str(path), "--set", f"run.name={name}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = tmp_path / "results" / name
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        outcomes.append(((run_dir / "acc_matrix.csv").read_text(),
                         [{k: v for k, v in r.items() if k != "seconds"} for r in log]))
    assert outcomes[0] == outcomes[1]


def test_per_task_settings_apply_to_their_task(tmp_path, tiny_config):
    """tasks[1] trains 5 updates with SAM while tasks[0] trains the run's 3 with plain training;
    a per-task method problem is reported at its task's path before anything is written."""
    tiny_config["tasks"][1]["training"] = {"max_steps": 5, "learning_rate": 0.02}
    tiny_config["tasks"][1]["flatness"] = {"method": "sam", "rho": 0.05}
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == [("t1", s) for s in (1, 2, 3)] + [("t2", s) for s in range(1, 6)]
    assert all("adv_loss" not in r for r in log[:3]) and all("adv_loss" in r for r in log[3:])
    assert {r["lr"] for r in log[:3]} == {0.01} and {r["lr"] for r in log[3:]} == {0.02}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["tasks"][1]["training"]["max_steps"] == 5 and saved["tasks"][1]["flatness"]["method"] == "sam"

    tiny_config["run"]["name"] = "bad"
    tiny_config["tasks"][1]["flatness"] = {"method": "rwp", "two_batch": True}  # needs ≥ 2 micro-batches
    tiny_config["tasks"][1]["training"] = {"gradient_accumulation_steps": 1}
    proc = run_cli(["train", str(write_config(tmp_path, tiny_config))], cwd=tmp_path)
    assert proc.returncode == 2 and "tasks.1.flatness.two_batch" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results" / "bad").exists()


def test_olora_strategy_end_to_end(tmp_path, tiny_config):
    """O-LoRA with SAM: the IncLoRA stack plus its terms, logged per update (zero orthogonality on
    the first task, positive after), and evaluable like any IncLoRA run."""
    tiny_config["lora"].update({"strategy": "olora", "lambda_orth": 0.5, "lambda_l2": 0.01})
    tiny_config["flatness"] = {"method": "sam", "rho": 0.05}
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    check_results_contract(run_dir, ["t1", "t2"], world=1, global_batch=8)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert all(r["olora_orth"] == 0 for r in log[:3]) and all(r["olora_orth"] > 0 for r in log[3:])
    assert all(r["olora_l2"] > 0 for r in log)
    proc = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 0 and "reproduced exactly" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_replay_mixes_earlier_examples_into_later_tasks(tmp_path, tiny_config):
    tiny_config["replay"] = {"examples_per_task": 8}
    tiny_config["training"].pop("max_steps")  # one epoch: 32 examples → 4 updates, 40 → 5 with replay
    path = write_config(tmp_path, tiny_config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "results/tiny/train_log.jsonl").read_text().splitlines()]
    t1, t2 = [r for r in log if r["task"] == "t1"], [r for r in log if r["task"] == "t2"]
    assert len(t1) == 4 and all("replayed_examples" not in r for r in t1)
    assert len(t2) == 5 and all(r["replayed_examples"] == 8 for r in t2)

"""`cl-flat train` end to end on `tiny-random:t5` (encoder-decoder) with builtin tasks, for `none`,
`sam`, `rwp scope: base` and `cflat`: the results contract of tests/integration/test_train_run.py, the
default LoRA targets resolved to T5's q, v, and `cl-flat eval` reproducing the last row; an
exact-match run (generation through the decoder) too."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import safe_open
from test_train_run import check_results_contract, write_config

from helpers import run_cli

pytestmark = pytest.mark.integration


def t5_config(tmp_path, flatness: dict) -> dict:
    return {
        "run": {"name": "t5", "output_dir": str(tmp_path / "results"), "seed": 1},
        "model": {"name_or_path": "tiny-random:t5"},
        "lora": {"r": 4, "alpha": 8},  # the default targets (q_proj, v_proj) become T5's q, v
        "tasks": [{"name": "food_sentiment", "source": "builtin", "n_train": 32, "n_test": 12},
                  {"name": "service_sentiment", "source": "builtin", "n_train": 32, "n_test": 12}],
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
                     "learning_rate": 0.01},
        "flatness": flatness,
        "evaluation": {"max_samples_per_task": 12, "batch_size": 8},
        "deepspeed": {"zero_stage": 0},
        "logging": {"progress": False},
    }


@pytest.mark.parametrize("flatness", [{"method": "none"}, {"method": "sam", "rho": 0.05},
                                      {"method": "rwp", "scope": "base", "noise_std": 0.05},
                                      {"method": "cflat", "rho": 0.05, "interval": 2}],
                         ids=["none", "sam", "rwp-base", "cflat"])
def test_t5_run_end_to_end(tmp_path, flatness):
    tasks = ["food_sentiment", "service_sentiment"]
    path = write_config(tmp_path, t5_config(tmp_path, flatness))
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "t5"
    check_results_contract(run_dir, tasks, world=1, global_batch=8)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["flatness"]["method"] == flatness["method"]
    with safe_open(str(run_dir / "adapters" / tasks[1] / "adapter_model.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
    # q and v of 6 attention blocks (encoder self; decoder self and cross), A and B each
    assert len(keys) == 24 and {k.split(".")[-3] for k in keys} == {"q", "v"}, keys
    if flatness["method"] == "sam":
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert all("adv_loss" in r for r in log)
    if flatness["method"] == "cflat":  # C-Flat at updates 0, 2 of each task, the plain mean at update 1
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [("first_order_norm" in r, r.get("cflat_update")) for r in log] == [(True, 1.0), (False, 0.0),
                                                                                   (True, 1.0)] * 2, log
    proc = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 0 and "reproduced exactly" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_t5_exact_match_run_with_per_task_settings(tmp_path):
    """Exact match by generation, and a per-task override: the second task trains 5 updates with SAM."""
    config = t5_config(tmp_path, {"method": "none"})
    config["evaluation"].update({"metric": "exact_match", "max_new_tokens": 4})
    config["tasks"][1].update({"training": {"max_steps": 5}, "flatness": {"method": "sam", "rho": 0.05}})
    path = write_config(tmp_path, config)
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "t5"
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the contract's files: checked above
    assert len(metrics["OP"]) == 2 and all(0 <= v <= 100 for v in metrics["OP"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == \
        [("food_sentiment", s) for s in (1, 2, 3)] + [("service_sentiment", s) for s in range(1, 6)]
    assert all("adv_loss" not in r for r in log[:3]) and all("adv_loss" in r for r in log[3:])

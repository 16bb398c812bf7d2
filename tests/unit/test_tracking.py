"""Tracking without a wandb process: WANDB_MODE in the environment beats the config's mode. The runs that
start wandb's service process, and RankLog in processes of its own: tests/integration/test_tracking_wandb.py
and tests/integration/test_rank_log.py."""

from __future__ import annotations


def test_wandb_mode_in_the_environment_overrides_the_config(tmp_path, tiny_config, monkeypatch):
    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tiny_config["logging"]["wandb"] = {"mode": "online"}
    with Tracker(validate_config(tiny_config), tmp_path / "train_log.jsonl", active=True) as tracker:
        tracker.log_update({"task": "t1", "step": 1, "loss": 0.5})
    assert not (tmp_path / "wandb").exists()

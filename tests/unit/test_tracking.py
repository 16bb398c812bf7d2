"""The tracker is a context manager: however the block ends, the jsonl log is complete and closed and
the wandb run is finished (offline here, never online)."""

from __future__ import annotations

import json

import pytest


def test_tracker_closes_log_and_wandb_run_when_the_block_raises(tmp_path, tiny_config, monkeypatch):
    import wandb

    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_config["logging"]["wandb"] = {"mode": "offline", "project": "cl-flat-test"}
    config = validate_config(tiny_config)
    log = tmp_path / "train_log.jsonl"
    with pytest.raises(RuntimeError, match="diverged"):
        with Tracker(config, log, active=True) as tracker:
            tracker.log_update({"task": "t1", "step": 1, "loss": 0.5})
            assert wandb.run is not None
            raise RuntimeError("diverged")
    assert wandb.run is None
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"task": "t1", "step": 1, "loss": 0.5}]
    with Tracker(config, log, active=False) as idle:  # other ranks: nothing is opened or written
        idle.log_update({"step": 2})
    assert len(log.read_text().splitlines()) == 1

"""Tracking with wandb runs (each starts wandb's service process): the tracker is a context manager (however
the block ends, the jsonl log is complete and closed and the wandb run finished); what it gives wandb is read
back from the offline run's own record file, complete once the tracker exits; an online run whose server refuses
or does not answer goes offline within `init_timeout`, with one warning. wandb runs offline here or against a local
port (closed, or open and silent), never online."""

from __future__ import annotations

import glob
import json
import socket
import struct
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.integration

BLOCK = 32768  # the .wandb file: LevelDB's log format (32 KiB blocks, 7-byte chunk headers) of protobuf Records


def wandb_records(run_folder: Path) -> list:
    """The protobuf Records of an offline run's run-<id>.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_folder / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding at the end of a block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_offline_run(run_folder: Path) -> dict:
    """{"run_id", "sweep_id", "name", "config", "history" (rows), "summary" (merged updates)} as wandb stored them."""
    def items(entries) -> dict:
        return {entry.key or ".".join(entry.nested_key): json.loads(entry.value_json) for entry in entries}

    run: dict = {"history": [], "summary": {}}
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, sweep_id=record.run.sweep_id, name=record.run.display_name,
                       config=items(record.run.config.update))
        elif kind == "history":
            run["history"].append(items(record.history.item))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
    return run


def offline_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")


def test_tracker_closes_log_and_wandb_run_when_the_block_raises(tmp_path, tiny_config, offline):
    import wandb

    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

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


def test_offline_run_holds_config_updates_rows_summary_table_and_images(tmp_path, tiny_config, offline):
    from cl_flat import plots
    from cl_flat.config import validate_config
    from cl_flat.matrix_csv import write_acc_matrix
    from cl_flat.tracking import Tracker

    tiny_config["logging"]["wandb"] = {"mode": "offline", "project": "cl-flat-test", "tags": ["unit"]}
    config = validate_config(tiny_config)
    names = ["t1", "t2"]
    rows = [("zero_shot", [50.0, 40.0]), ("t1", [90.0, 45.0]), ("t2", [70.0, 80.0])]
    probe_rows = [("zero_shot", [30.0]), ("t1", [35.0]), ("t2", [25.0])]  # a probe: scored, never trained
    write_acc_matrix(tmp_path / "acc_matrix.csv", names, rows)
    images = {"acc_matrix": tmp_path / "plots" / "acc_matrix.png", "op_curve": tmp_path / "plots" / "op_curve.png",
              "learning_curves": tmp_path / "plots" / "not_drawn.png"}
    plots.plot_acc_matrix(tmp_path / "acc_matrix.csv", images["acc_matrix"])
    plots.plot_op_curve(tmp_path / "acc_matrix.csv", images["op_curve"])
    metrics = {"AA": 75.0, "BWT": -20.0, "FWT": 5.0, "F": 20.0, "AIA": 82.5, "OP": [90.0, 75.0], "sharpness": None}

    with Tracker(config, tmp_path / "train_log.jsonl", active=True, meta={"world_size": 1}) as tracker:
        tracker.log_row(names, rows[:1], ["p"], probe_rows[:1])
        tracker.log_update({"task": "t1", "task_index": 0, "step": 1, "loss": 0.7, "lr": 0.01,
                            "grad_norm": float("nan"), "eps_norm": 0.05, "nonfinite": ["grad_norm"]})
        tracker.log_row(names, rows[:2], ["p"], probe_rows[:2])
        tracker.log_row(names, rows, ["p"], probe_rows)
        tracker.log_results(names, rows, metrics, images, ["p"], probe_rows)

    assert json.loads((tmp_path / "train_log.jsonl").read_text())["grad_norm"] is None  # strict JSON: null
    (folder,) = offline_runs(tmp_path)
    run = read_offline_run(folder)
    assert run["name"] == "tiny"
    assert run["config"]["flatness.method"] == "none" and run["config"]["run.seed"] == 1
    assert run["config"]["meta.world_size"] == 1 and run["config"]["logging.wandb.tags"] == ["unit"]
    update = next(row for row in run["history"] if "train/loss" in row)
    assert update["train/loss"] == 0.7 and update["train/lr"] == 0.01 and update["train/eps_norm"] == 0.05
    assert "train/nonfinite" not in update
    evaluated = [row for row in run["history"] if "eval/after_task" in row]
    assert [(r["eval/after_task"], r["eval/acc/t1"], r["eval/acc/t2"]) for r in evaluated] == [
        (0, 50, 40), (1, 90, 45), (2, 70, 80)]
    assert "eval/OP" not in evaluated[0]
    assert [r["eval/probe/p"] for r in evaluated] == [30, 35, 25]
    assert [r["eval/OP"] for r in evaluated[1:]] == [90, (70 + 80) / 2]  # OP_t = mean_{i<=t} R[t, i]
    summary = run["summary"]
    assert {k: summary[k] for k in ("AA", "BWT", "FWT", "F", "AIA", "OP")} == {k: v for k, v in metrics.items()
                                                                             if k != "sharpness"}
    assert "sharpness" not in summary  # null values are left out
    table = json.loads((folder / "files" / summary["acc_matrix.path"]).read_text())
    assert table["columns"] == ["after_task", "t1", "t2"]
    assert table["data"] == [[after, *scores] for after, scores in rows]
    table = json.loads((folder / "files" / summary["probe_matrix.path"]).read_text())
    assert table["columns"] == ["after_task", "p"] and table["data"] == [["zero_shot", 30], ["t1", 35], ["t2", 25]]
    for name in ("acc_matrix", "op_curve"):
        assert summary[f"plots/{name}.format"] == "png"
        assert (folder / "files" / summary[f"plots/{name}.path"]).read_bytes()[:4] == b"\x89PNG"
    assert not any(key.startswith("plots/learning_curves") for key in summary)  # not drawn: not logged


@pytest.fixture
def silent_server():
    """A local port that takes connections and never answers (nothing leaves the host)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_an_unreachable_server_costs_at_most_init_timeout_then_the_run_logs_offline(tmp_path, tiny_config, monkeypatch,
                                                                                   capfd, server, request):
    from cl_flat.config import validate_config
    from cl_flat.tracking import Tracker

    # closed: the connection is refused; silent: wandb waits for an answer until its timeout
    port = free_port() if server == "closed" else request.getfixturevalue("silent_server")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    init_timeout = 8
    tiny_config["logging"]["wandb"] = {"mode": "online", "project": "cl-flat-test", "init_timeout": init_timeout}
    config = validate_config(tiny_config)
    started = time.monotonic()
    with Tracker(config, tmp_path / "train_log.jsonl", active=True) as tracker:
        waited = time.monotonic() - started
        tracker.log_update({"task": "t1", "task_index": 0, "step": 1, "loss": 0.25})
    assert waited < init_timeout + 2, waited  # the offline fallback included (importing wandb: the slack)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 1 and "logging offline" in warnings[0] and "wandb sync" in warnings[0], warnings
    # complete once the Tracker exits (wandb's service closed its files), not eventually
    (folder,) = offline_runs(tmp_path)
    assert any(row.get("train/loss") == 0.25 for row in read_offline_run(folder)["history"])

"""`cl-flat landscape` end to end on a tiny 2-task run: csv grids, PNGs, sharpness.json schema,
saved adapters unchanged, and clear errors for bad input."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli

pytestmark = pytest.mark.integration


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> tuple[list[str], list[list[float]]]:
    rows = list(csv.reader(path.open()))
    return rows[0], [[float(v) for v in r] for r in rows[1:]]


def test_landscape_cli(tmp_path, tiny_config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "results" / "tiny"
    adapters = _hashes(run_dir / "adapters")
    assert any(name.endswith("adapter_model.safetensors") for name in adapters)

    proc = run_cli(["landscape", str(run_dir), "--task", "t1", "--dims", "1", "--points", "5"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    header, rows = _rows(run_dir / "landscape" / "t1_1d.csv")
    assert header == ["alpha", "loss"]
    assert [r[0] for r in rows] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert all(r[1] > 0 for r in rows)
    assert (run_dir / "plots" / "landscape_t1_1d.png").read_bytes()[:4] == b"\x89PNG"
    # passes over the held-out sample: L(θ) once + 4 other grid points + M = 8 samples + the last ascent
    # iterate forward-only; 5 ascent steps (evaluation.sharpness_ascent_steps) of one forward+backward each
    assert "14 forward + 5 forward+backward passes" in proc.stdout, proc.stdout
    first = json.loads((run_dir / "landscape" / "sharpness.json").read_text())["t1"]
    assert first["samples"] == 8 and first["ascent_steps"] == 5 and first["ball"] == "filter-wise"
    assert first["worst"] >= first["avg"]
    # the Hessian measures too, with the run's settings (evaluation.hessian_*)
    assert first["lambda_max"] > 0 and first["hessian_iters"] == 20 and first["hessian_probes"] == 8
    assert f"lambda_max {first['lambda_max']:.4g}" in proc.stdout, proc.stdout

    proc = run_cli(["landscape", str(run_dir), "--task", "t1", "--dims", "2", "--points", "3", "--samples", "2"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    header, rows = _rows(run_dir / "landscape" / "t1_2d.csv")
    assert header == ["alpha", "beta", "loss"]
    assert sorted((a, b) for a, b, _ in rows) == [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]
    assert (run_dir / "plots" / "landscape_t1_2d.png").read_bytes()[:4] == b"\x89PNG"
    # alpha = beta = 0 is the unperturbed loss, as on the 1-D curve
    _, curve = _rows(run_dir / "landscape" / "t1_1d.csv")
    centre = next(loss for a, b, loss in rows if a == 0.0 and b == 0.0)
    assert centre == pytest.approx(curve[2][1], rel=1e-9)

    sharp = json.loads((run_dir / "landscape" / "sharpness.json").read_text())
    entry = sharp["t1"]
    assert set(entry) >= {"avg", "worst", "rho", "samples"}
    assert all(isinstance(entry[k], (int, float)) for k in ("avg", "worst", "rho", "samples"))
    assert entry["samples"] == 2 and entry["rho"] == pytest.approx(0.05)  # the config default
    assert entry["worst"] >= entry["avg"]
    assert entry["loss"] == pytest.approx(curve[2][1], rel=1e-9)

    # every trained task by default, later adapters with --after
    proc = run_cli(["landscape", str(run_dir), "--points", "3", "--samples", "1", "--space", "merged"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    proc = run_cli(["landscape", str(run_dir), "--task", "t1", "--after", "t2", "--points", "3", "--samples", "1",
                    "--ascent-steps", "1", "--max-samples", "5"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    landscape = run_dir / "landscape"
    assert (landscape / "t1_merged_1d.csv").is_file() and (landscape / "t2_merged_1d.csv").is_file()
    assert (landscape / "t1_after_t2_1d.csv").is_file()
    sharp = json.loads((landscape / "sharpness.json").read_text())
    assert set(sharp) == {"t1", "t2", "t1_merged", "t2_merged", "t1_after_t2"}  # t2: by the train run (default)
    assert sharp["t1_after_t2"]["after"] == "t2"
    assert sharp["t1_after_t2"]["ascent_steps"] == 1 and sharp["t1_after_t2"]["examples"] == 5
    assert "5 forward + 1 forward+backward passes" in proc.stdout, proc.stdout  # 1 + 2 + 1 + 1

    assert _hashes(run_dir / "adapters") == adapters  # saved adapters untouched

    # bad input: one clear line, exit 1, no traceback (the other cases: tests/unit/test_landscape.py)
    proc = run_cli(["landscape", str(run_dir), "--task", "t2", "--after", "t1"], cwd=tmp_path)
    assert proc.returncode == 1 and "--after must be" in proc.stderr and "Traceback" not in proc.stderr

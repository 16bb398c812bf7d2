"""`cl-flat bench` runs on a tiny model and writes the documented format (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

pytestmark = pytest.mark.integration


def test_bench_writes_documented_format(tmp_path: Path):
    config = {"run": {"name": "bt", "seed": 0}, "model": {"name_or_path": "tiny-random:llama"},
              "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "tasks": [{"name": "food_sentiment", "source": "builtin"}],
              "training": {"micro_batch_size": 2, "max_seq_length": 16}, "logging": {"progress": False}}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli(["bench", str(path), "--methods", "sam,rwp_parallel_2ranks", "--updates", "2", "--warmup", "1",
                    "--out", str(tmp_path / "out"), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    saved = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert printed == saved
    assert saved["model"] == "tiny-random:llama" and saved["device"].startswith("cpu")
    assert set(saved["methods"]) == {"none", "none_2ranks", "sam", "rwp_parallel_2ranks"}
    for label, entry in saved["methods"].items():
        assert entry["seconds_per_update"] > 0 and entry["peak_memory_bytes"] > 0
        base = saved["methods"][entry["compared_with"]]
        assert entry["time_ratio"] == pytest.approx(entry["seconds_per_update"] / base["seconds_per_update"])
        assert entry["memory_ratio"] == pytest.approx(entry["peak_memory_bytes"] / base["peak_memory_bytes"])
    assert saved["methods"]["rwp_parallel_2ranks"]["ranks"] == 2
    table = (tmp_path / "out" / "bench-cpu.md").read_text()
    assert "| rwp_parallel_2ranks |" in table and "| none |" in table

"""`cl-flat bench` runs on a tiny model and writes the documented format (no timing asserts); every
one-process variant measures. How rounds, pairs and failures make the table: tests/unit/test_bench_rounds.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_flat.bench import variants
from helpers import run_cli, tiny_bench_config

pytestmark = pytest.mark.integration


def test_bench_writes_documented_format(tmp_path: Path):
    path = tiny_bench_config(tmp_path)
    proc = run_cli(["bench", str(path), "--methods", "sam,rwp_parallel_2ranks", "--updates", "2", "--warmup", "1",
                    "--out", str(tmp_path / "out"), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    saved = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert printed == saved
    assert saved["model"] == "tiny-random:llama" and saved["device"].startswith("cpu")
    # floor and none come with every one-process variant, none_2ranks with every two-process one
    assert set(saved["methods"]) == {"none", "floor", "none_2ranks", "sam", "rwp_parallel_2ranks"}
    m = saved["methods"]
    assert m["floor"]["time_ratio_floor"] == pytest.approx(1.0)
    # the floor is timed against `none` in its own process too: none × floor is the inverse of that pair
    assert m["floor"]["time_ratio_paired_in_process"] and m["floor"]["time_ratio"] > 0
    assert m["none"]["time_ratio_floor"] == pytest.approx(1 / m["floor"]["time_ratio"])
    assert m["sam"]["time_ratio_floor"] == pytest.approx(m["sam"]["time_ratio"] * m["none"]["time_ratio_floor"])
    assert m["rwp_parallel_2ranks"]["time_ratio_floor"] is None and m["none_2ranks"]["time_ratio_floor"] is None
    for label, entry in saved["methods"].items():
        assert entry["seconds_per_update"] > 0 and entry["peak_memory_bytes"] > 0
        base = saved["methods"][entry["compared_with"]]
        if label in ("sam", "floor", "rwp_parallel_2ranks"):  # timed against `none` in the same process(es)
            assert entry["time_ratio_paired_in_process"] and entry["time_ratio"] > 0
        else:
            assert not entry["time_ratio_paired_in_process"]
            assert entry["time_ratio"] == pytest.approx(entry["seconds_per_update"] / base["seconds_per_update"])
        assert entry["memory_ratio"] == pytest.approx(entry["peak_memory_bytes"] / base["peak_memory_bytes"])
    assert saved["methods"]["rwp_parallel_2ranks"]["ranks"] == 2
    table = (tmp_path / "out" / "bench-cpu.md").read_text()
    assert "| rwp_parallel_2ranks |" in table and "| none |" in table
    assert "| time × none | time × floor | device ops | host syncs |" in table and "| floor |" in table
    # one update counted: the loop's one host sync plus transformers' mask check per forward (sam: two forwards)
    assert [m[k]["host_syncs_per_update"] for k in ("floor", "none", "sam")] == [2, 2, 3]
    assert 0 < m["none"]["device_ops_per_update"] < m["sam"]["device_ops_per_update"]
    assert f"| none | {m['none']['seconds_per_update']:.3f} |" in table
    assert f"| {m['none']['device_ops_per_update']} | 2 |" in table
    # the evaluation rows (on by default), each measured in its own process
    assert set(saved["evaluation"]) == {"eval_rank_classification", "eval_exact_match"}
    for entry in saved["evaluation"].values():
        assert entry["examples_per_second"] > 0 and entry["examples"] == 32 and "error" not in entry
    assert "| evaluation | examples/s | s/pass |" in table and "| eval_exact_match |" in table


@pytest.mark.parametrize("label", [label for label, (_, ranks) in variants().items() if ranks == 1])
def test_every_one_process_variant_measures(tmp_path: Path, label: str):
    """Each variant of the default `cl-flat bench` runs through `measure` (a full bench stops at the first failure)."""
    from cl_flat import bench

    path = tiny_bench_config(tmp_path)
    outcome = bench.measure(str(path), label, 1, 0)
    assert outcome["seconds_per_update"] > 0 and outcome["peak_memory_bytes"] > 0
    if label != "none":  # every one-process variant but `none` itself is also timed against `none` in its process
        assert outcome["paired_time_ratio"] > 0

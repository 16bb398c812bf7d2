"""`cl-flat bench` without running a variant (each variant's measurement faked): rounds pair the ratios
within a round, a worker's in-process pairs decide the time ratio, a failing variant is recorded while the
others go on, and the command saves what was measured before it exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import tiny_bench_config


def test_rounds_pair_ratios_within_a_round(tmp_path: Path, monkeypatch):
    """Three rounds with a machine that slows down in round 2: the ratio is paired per round."""
    from cl_flat.recipes import bench

    config = {"run": {"name": "bt", "seed": 0}, "model": {"name_or_path": "tiny-random:llama"},
              "tasks": [{"name": "food_sentiment", "source": "builtin"}]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    seconds = {"none": [1.0, 2.0, 1.0], "floor": [0.8, 1.6, 1.0], "sam": [2.1, 4.0, 1.9]}
    memory = {"none": [100, 100, 110], "floor": [120, 120, 120], "sam": [103, 104, 102]}
    calls: list[str] = []

    def fake(config_path, label, updates, warmup, overrides):
        round_ = sum(1 for c in calls if c == label)
        calls.append(label)
        return {"seconds_per_update": seconds[label][round_], "peak_memory_bytes": memory[label][round_],
                "updates": updates, "ranks": 1}

    monkeypatch.setattr(bench, "_run_variant", fake)
    result = bench.run_bench(str(path), ["sam"], 2, 0, rounds=3)
    assert calls == ["none", "floor", "sam"] * 3  # interleaved
    sam = result["methods"]["sam"]
    assert sam["seconds_per_update"] == 2.1                   # median of 2.1, 4.0, 1.9
    assert sam["time_ratio"] == pytest.approx(2.0)            # median of 2.1, 2.0, 1.9
    assert sam["peak_memory_bytes"] == 104
    assert sam["memory_ratio"] == pytest.approx(1.03)         # median of 1.03, 1.04, 102/110
    assert sam["rounds"] == [2.1, 4.0, 1.9] and result["rounds"] == 3
    assert sam["time_ratio_floor"] == pytest.approx(2.5)       # median of 2.1/0.8, 4.0/1.6, 1.9/1.0
    assert sam["time_ratio_rounds"] == pytest.approx([2.1, 2.0, 1.9])
    assert "| sam | 2.100 | 2.000 | 2.500 |" in bench.markdown_table(result)
    assert bench.markdown_table(result).splitlines()[-1].endswith("| 1.900–2.100 |")  # sam's rounds, lowest–highest
    assert "| none | 1.000 | 1.000 |" in bench.markdown_table(result)
    assert next(line for line in bench.markdown_table(result).splitlines() if line.startswith("| none |")).endswith(
        "| none | — |")  # its own baseline: no range


def _bench_of(tmp_path: Path, monkeypatch, outcome: dict[str, list[tuple[float, float | None]]]) -> dict:
    """The rows of a two-round bench of floor and sam whose workers report `outcome`: per label and round,
    (s/update, the in-process paired ratio or None)."""
    from cl_flat.recipes import bench

    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "bt", "seed": 0}, "model": {"name_or_path": "tiny-random:llama"},
                                    "tasks": [{"name": "food_sentiment", "source": "builtin"}]}))
    calls: list[str] = []

    def fake(config_path, label, updates, warmup, overrides):
        seconds, paired = outcome[label][calls.count(label)]
        calls.append(label)
        result = {"seconds_per_update": seconds, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}
        return result if paired is None else {**result, "paired_time_ratio": paired}

    monkeypatch.setattr(bench, "_run_variant", fake)
    return bench.run_bench(str(path), ["floor", "sam"], 2, 0, rounds=2)["methods"]


def test_in_process_pairs_decide_the_time_ratio(tmp_path: Path, monkeypatch):
    """A worker's paired ratio (method vs `none` alternating in its process) wins over the ratio
    of two processes' times; floor has none and keeps the cross-process ratio."""
    outcome = {"none": [(1.0, None), (1.0, None)], "floor": [(1.1, None), (0.9, None)],
               "sam": [(2.4, 1.98), (2.2, 2.02)]}
    methods = _bench_of(tmp_path, monkeypatch, outcome)
    assert methods["sam"]["time_ratio"] == pytest.approx(2.0)      # median of 1.98, 2.02 (not 2.3)
    assert methods["sam"]["time_ratio_paired_in_process"]
    assert methods["floor"]["time_ratio"] == pytest.approx(1.0)    # median of 1.1, 0.9
    # against the floor: the paired ratio chained with none/floor of the same round
    assert methods["sam"]["time_ratio_floor"] == pytest.approx((1.98 / 1.1 + 2.02 / 0.9) / 2)
    assert not methods["floor"]["time_ratio_paired_in_process"]


def test_a_floor_paired_with_none_in_its_process_sets_none_over_floor(tmp_path: Path, monkeypatch):
    """The floor's worker also alternates it with `none` (paired floor/none): that pair, not the two processes'
    times, gives none × floor, and every method's × floor chains its own pair to it."""
    outcome = {"none": [(1.2, None), (1.0, None)], "floor": [(0.9, 1.08), (0.8, 1.12)],
               "sam": [(2.4, 1.98), (2.2, 2.02)]}
    methods = _bench_of(tmp_path, monkeypatch, outcome)
    assert methods["floor"]["time_ratio"] == pytest.approx(1.10)              # median of 1.08, 1.12
    assert methods["floor"]["time_ratio_paired_in_process"]
    assert methods["floor"]["time_ratio_floor"] == pytest.approx(1.0)
    assert methods["none"]["time_ratio_floor"] == pytest.approx((1 / 1.08 + 1 / 1.12) / 2)  # not 1.2/0.9, 1.0/0.8
    assert methods["sam"]["time_ratio_floor"] == pytest.approx((1.98 / 1.08 + 2.02 / 1.12) / 2)


def test_a_failing_variant_is_recorded_and_the_others_go_on(tmp_path: Path, monkeypatch):
    """sam fails in round 1 of 3, asam in every round, floor in round 3: each row is over the rounds
    in which it and what it is compared with succeeded; the result so far is handed on after every run."""
    from cl_flat.errors import UserError
    from cl_flat.recipes import bench

    path = tiny_bench_config(tmp_path)
    seconds = {"none": [1.0, 2.0, 1.0], "floor": [0.5, 1.0, None], "sam": [None, 4.4, 2.0], "asam": [None] * 3}
    calls: list[str] = []

    def fake(config_path, label, updates, warmup, overrides):
        value = seconds[label][calls.count(label)]
        calls.append(label)
        if value is None:
            raise UserError(f"bench variant {label!r} failed:\nTraceback ...\nRuntimeError: {label} broke")
        return {"seconds_per_update": value, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}

    progress: list[dict] = []
    monkeypatch.setattr(bench, "_run_variant", fake)
    result = bench.run_bench(str(path), ["sam", "asam"], 2, 0, rounds=3, on_progress=progress.append)
    assert calls == ["none", "floor", "sam", "asam"] * 3
    assert len(progress) == 12 and progress[-1] == result
    assert list(progress[0]["methods"]) == ["none"] and progress[0]["rounds"] == 1
    sam = result["methods"]["sam"]
    assert sam["time_ratio"] == pytest.approx(2.1)                    # median of 4.4/2.0, 2.0/1.0
    assert sam["time_ratio_floor"] == pytest.approx(4.4 / 1.0)        # round 2 only: round 3 has no floor
    assert sam["rounds"] == [None, 4.4, 2.0] and sam["failed_rounds"] == 1
    assert sam["error"].endswith("RuntimeError: sam broke")
    asam = result["methods"]["asam"]
    assert "seconds_per_update" not in asam and asam["error"].endswith("asam broke")
    assert result["methods"]["floor"]["failed_rounds"] == 1
    assert bench.failed_variants(result) == ["floor", "sam", "asam"]
    table = bench.markdown_table(result)
    assert "| asam | failed | — | — | — | — | — | — | none |" in table
    assert "- asam: RuntimeError: asam broke" in table and "| sam | 3.200 | 2.100 | 4.400 |" in table


def test_cli_saves_what_was_measured_and_exits_non_zero_on_a_failed_variant(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from cl_flat.cli import app
    from cl_flat.errors import UserError
    from cl_flat.recipes import bench

    def fake(config_path, label, updates, warmup, overrides):
        if label == "sam":
            raise UserError("bench variant 'sam' failed:\nMemoryError")
        return {"seconds_per_update": 1.0, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}

    monkeypatch.setattr(bench, "_run_variant", fake)
    path = tiny_bench_config(tmp_path)
    outcome = CliRunner().invoke(app, ["bench", str(path), "--methods", "sam", "--no-eval",
                                       "--out", str(tmp_path / "out")])
    assert isinstance(outcome.exception, UserError) and outcome.exception.exit_code == 1
    assert "1 variant(s) failed: sam" in str(outcome.exception)
    saved = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert saved["methods"]["none"]["seconds_per_update"] == 1.0
    assert saved["methods"]["sam"]["error"].endswith("MemoryError")


def test_set_reaches_every_variant_and_the_header_and_flatness_is_refused(tmp_path: Path, monkeypatch):
    """`cl-flat bench --set k=v` changes the config of every variant's worker and is recorded; flatness.* is
    the variants' own section, so setting it is a named error before anything runs."""
    from typer.testing import CliRunner

    from cl_flat.cli import app
    from cl_flat.errors import ConfigError
    from cl_flat.recipes import bench

    seen: list[tuple[str, list[str]]] = []

    def fake(config_path, label, updates, warmup, overrides):
        seen.append((label, overrides))
        return {"seconds_per_update": 1.0, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}

    monkeypatch.setattr(bench, "_run_variant", fake)
    path = tiny_bench_config(tmp_path)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(app, ["bench", str(path), "--methods", "sam", "--no-eval", "--out", str(out),
                                       "--set", "training.micro_batch_size=3"])
    assert outcome.exit_code == 0, outcome.output
    assert seen == [(label, ["training.micro_batch_size=3"]) for label in ("none", "floor", "sam")]
    saved = json.loads((out / "bench-cpu.json").read_text())
    assert saved["overrides"] == ["training.micro_batch_size=3"] and saved["batch"].startswith("3 x ")
    assert "config overrides: training.micro_batch_size=3" in (out / "bench-cpu.md").read_text()

    seen.clear()
    refused = CliRunner().invoke(app, ["bench", str(path), "--no-eval", "--out", str(tmp_path / "other"),
                                       "--set", "flatness.rho=0.1"])
    assert isinstance(refused.exception, ConfigError) and not seen
    assert "--set flatness.rho: each variant sets the flatness section" in str(refused.exception)


def test_a_quartet_cancels_a_steady_drift():
    """Every update 10% slower than the one before (the k-th call takes base·(1 + 0.1k)): baseline, timed,
    timed, baseline gives (2.2 + 2.4) / (1.0 + 1.3) = 2 exactly for a timed/baseline of 2, where the
    order baseline-then-timed would read 2.2/1.0 = 2.2 and 2.6/1.2 ≈ 2.17."""
    from cl_flat.bench import quartet_ratio, quartets

    calls: list[str] = []

    def clock(name: str, base: float):
        def update() -> float:
            calls.append(name)
            return base * (1 + 0.1 * (len(calls) - 1))
        return update

    assert quartet_ratio(clock("timed", 2.0), clock("baseline", 1.0), 3) == pytest.approx(2.0)
    assert calls == ["baseline", "timed", "timed", "baseline"] * 3
    assert [quartets(n) for n in (1, 2, 5, 6)] == [1, 1, 3, 3]  # about as many updates of each as n pairs

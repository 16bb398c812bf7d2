"""`cl-flat bench`'s evaluation rows and its output files: the rows' medians over rounds and their table
(each run faked), one real evaluation measurement on a tiny model (no timing asserts), and a bench that
refuses to replace an earlier table (a committed reference) without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_bench_config


def test_evaluation_rows_are_medians_over_rounds_and_a_table_of_their_own(tmp_path: Path, monkeypatch):
    from cl_flat.errors import UserError
    from cl_flat.recipes import bench

    per_second = {"eval_rank_classification": [10.0, 30.0, 20.0], "eval_exact_match": [2.0, None, 4.0]}
    calls: list[str] = []

    def fake(config_path, label, updates, warmup, overrides):
        calls.append(label)
        if label not in per_second:
            return {"seconds_per_update": 1.0, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}
        value = per_second[label][calls.count(label) - 1]
        if value is None:
            raise UserError(f"bench variant {label!r} failed:\nRuntimeError: generate broke")
        return {"examples_per_second": value, "seconds_per_pass": 8 / value, "examples": 8, "updates": updates,
                "peak_memory_bytes": 100, "ranks": 1}

    monkeypatch.setattr(bench, "_run_variant", fake)
    result = bench.run_bench(str(tiny_bench_config(tmp_path)), ["none"], 2, 0, rounds=3, evaluation=True)
    assert calls == ["none", "floor", "eval_rank_classification", "eval_exact_match"] * 3
    rank, exact = result["evaluation"]["eval_rank_classification"], result["evaluation"]["eval_exact_match"]
    assert rank["examples_per_second"] == 20.0 and rank["seconds_per_pass"] == pytest.approx(0.4)
    assert rank["rounds"] == [10.0, 30.0, 20.0] and "error" not in rank
    assert exact["examples_per_second"] == 3.0 and exact["rounds"] == [2.0, None, 4.0]   # median of 2 and 4
    assert exact["error"].endswith("generate broke")
    assert bench.failed_variants(result) == ["eval_exact_match"]
    table = bench.markdown_table(result)
    assert "| eval_rank_classification | 20.00 | 0.400 |" in table and "| eval_exact_match | 3.00 |" in table
    assert "- eval_exact_match: RuntimeError: generate broke" in table
    assert "evaluation" not in bench.run_bench(str(tiny_bench_config(tmp_path)), ["none"], 1, 0)  # off by default


@pytest.mark.parametrize("label", ["eval_rank_classification", "eval_exact_match"])
def test_an_evaluation_row_measures(tmp_path: Path, label: str):
    """The real measurement on tiny-random:llama (one batch of evaluation.batch_size examples), over ten
    labels of several tokens each."""
    from cl_flat import bench
    from cl_flat.data.batches import prompt_and_targets
    from cl_flat.models import load_model

    outcome = bench.measure_evaluation(str(tiny_bench_config(tmp_path)), label, 1, 0)
    assert outcome["examples_per_second"] > 0 and outcome["examples"] == 32 and outcome["updates"] == 1
    task = bench.eval_task("accuracy", 2, 16)
    _, tokenizer = load_model("tiny-random:llama")
    _, labels = prompt_and_targets(tokenizer, task.prompt(task.test[0]), task.labels)
    assert len(labels) == 10 and min(map(len, labels)) > 1


def test_bench_refuses_to_replace_an_earlier_table_without_overwrite(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from cl_flat.cli import app
    from cl_flat.errors import ConfigError
    from cl_flat.recipes import bench

    calls: list[str] = []

    def fake(config_path, label, updates, warmup, overrides):
        calls.append(label)
        return {"seconds_per_update": 1.0, "peak_memory_bytes": 100, "updates": updates, "ranks": 1}

    monkeypatch.setattr(bench, "_run_variant", fake)
    path, out = tiny_bench_config(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "bench-cpu.md").write_text("the committed reference\n")
    args = ["bench", str(path), "--methods", "none", "--no-eval", "--out", str(out)]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, ConfigError) and refused.exception.exit_code == 2
    assert "bench-cpu.md already exist(s); pass --overwrite" in str(refused.exception)
    assert calls == [] and (out / "bench-cpu.md").read_text() == "the committed reference\n"
    assert not (out / "bench-cpu.json").exists()
    replaced = CliRunner().invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "bench-cpu.json").read_text())["methods"]["none"]["seconds_per_update"] == 1.0
    assert (out / "bench-cpu.md").read_text().startswith("# cl-flat bench")

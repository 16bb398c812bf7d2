"""`cl-flat report` through its entry point in a subprocess, on the hand-made result folders of
report_runs.py: a bad path exits 2 with one line and writes nothing; a glob of runs grouped by a key;
--published, --pair-by and --primary; a bad --flatness-measure or --primary exits 2 before anything is
written."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli
from report_runs import make_results

pytestmark = pytest.mark.integration


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return make_results(tmp_path / "results")


def test_cli_bad_path_exits_2_with_one_line_and_writes_nothing(tmp_path):
    result = run_cli(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder"]
    assert not (tmp_path / "out").exists()


def test_cli_report(results, tmp_path):
    result = run_cli(["report", str(results / "*"), "--out", str(tmp_path / "out"), "--group-by", "flatness.method"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "## Groups (by flatness.method)" in result.stdout
    assert "| flatness.method=sam | 3 | 1 2 3 |" in result.stdout
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.csv").is_file()


def test_cli_report_published_and_pairing_options(results, tmp_path):
    result = run_cli(["report", str(results), "--out", str(tmp_path / "out"), "--published", "standard",
                      "--pair-by", "seed", "--primary", "BWT"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 paired differences are tested here (one per group and primary measure: ΔBWT;" in result.stdout
    assert "| published: O-LoRA | — | — | 75.8 |" in result.stdout
    assert "Mean over pairs (runs with the same run.seed)" in result.stdout
    assert (tmp_path / "out" / "paired_differences.png").is_file()
    bad = run_cli(["report", str(results), "--out", str(tmp_path / "bad"), "--flatness-measure", "flattest"],
                  cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --flatness-measure flattest: expected one of auto, worst, avg, "
                                               "lambda_max, trace"]
    assert not (tmp_path / "bad").exists()
    bad = run_cli(["report", str(results), "--out", str(tmp_path / "bad"), "--primary", "forgetting"], cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --primary forgetting: expected comma-separated measures of "
                                               "this report's paired differences, e.g. BWT,lambda_max; they are AA, "
                                               "BWT, FWT, F, AIA (forgetting is not one)"]
    assert not (tmp_path / "bad").exists()

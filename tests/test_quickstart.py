"""The real quickstart (SmolLM2-135M, builtin tasks) meets its goals: every task gains at
least 20 points over zero-shot right after training (or reaches 90%), and forgetting is
measurable (BWT <= -3 points). Several minutes on a 2-core CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_flat.matrix_csv import read_acc_matrix
from helpers import ROOT, run_cli


@pytest.mark.slow
def test_quickstart_learns_and_forgets(tmp_path: Path):
    proc = run_cli(["train", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"run.output_dir={tmp_path}"],
                   cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "quickstart"
    names, matrix, zero_shot = read_acc_matrix(run_dir / "acc_matrix.csv")
    assert len(names) >= 3
    for i in range(len(names)):
        assert matrix[i][i] >= min(zero_shot[i] + 20.0, 90.0), (names[i], matrix[i][i], zero_shot[i])
    # BWT recomputed here from the matrix: mean over i < T of R[T,i] - R[i,i]
    last = len(names) - 1
    bwt = sum(matrix[last][i] - matrix[i][i] for i in range(last)) / last
    assert bwt <= -3.0
    assert json.loads((run_dir / "metrics.json").read_text())["BWT"] == pytest.approx(bwt)

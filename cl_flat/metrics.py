"""Continual-learning metrics on the accuracy matrix (pure functions).

R[t, i] is the score (percent) on task i after training tasks 1..t, for t, i = 1..T;
b_i = R[0, i] is the optional zero-shot row measured before any training.

Every entry is already a *per-task* score (the mean over that task's test samples).
These functions never see per-sample data: all averages below are unweighted means over
tasks, so a task with 10 test samples counts as much as one with 10,000.

Indices in docstrings and error messages are 1-indexed, as in the papers; the
Python containers are 0-indexed. Upper-triangle entries (i > t, tasks not yet
trained) may be missing (None or NaN): only FWT needs them and is then None.
Entries on or below the diagonal are required by the metrics that use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "average_accuracy",
    "online_performance",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "compute_metrics",
    "METRICS",
    "REFERENCE_MEASURES",
    "probe_drift",
    "probe_metrics",
    "score",
]

Score = float | None
Matrix = list[list[Score]]
MatrixLike = Sequence[Sequence[Any]] | np.ndarray
Rows = list[tuple[str, list[float]]]  # acc_matrix.csv as (after_task, scores) rows: zero_shot first, then one per task

ZERO_SHOT = "zero_shot"


# ---------------------------------------------------------------------------
# input normalisation
# ---------------------------------------------------------------------------


def score(value: Any) -> Score:
    """None/NaN -> None (missing); anything else -> float."""
    if value is None:
        return None
    x = float(value)
    return None if math.isnan(x) else x


def _as_matrix(matrix: MatrixLike) -> Matrix:
    """Square T x T list of floats/None; raises ValueError on any other shape."""
    if isinstance(matrix, np.ndarray):
        if matrix.ndim != 2:
            raise ValueError(f"accuracy matrix must be 2-D (T x T), got shape {matrix.shape}")
        matrix = matrix.tolist()
    rows = [[score(v) for v in row] for row in matrix]
    n = len(rows)
    if n == 0:
        raise ValueError("accuracy matrix is empty: expected T >= 1 rows")
    for t, row in enumerate(rows, start=1):
        if len(row) != n:
            raise ValueError(f"accuracy matrix must be square (T x T with T={n}); "
                             f"row {t} has {len(row)} columns")
    return rows


def _as_row(zero_shot: Sequence[Any] | np.ndarray | None, n: int) -> list[Score] | None:
    if zero_shot is None:
        return None
    b = [score(v) for v in (zero_shot.tolist() if isinstance(zero_shot, np.ndarray) else zero_shot)]
    if len(b) != n:
        raise ValueError(f"zero-shot row has {len(b)} entries; expected T={n}")
    return b


def _req(R: Matrix, t: int, i: int, metric: str) -> float:
    """R[t, i] (1-indexed); a missing required entry is an error, not a silent 0."""
    v = R[t - 1][i - 1]
    if v is None:
        raise ValueError(f"{metric} needs R[{t},{i}] (row after task {t}, column task {i}), "
                         "which is missing")
    return v


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def average_accuracy(matrix: MatrixLike) -> float:
    """AA = (1/T) Σ_i R[T,i]: mean final score over all tasks (Chaudhry et al. 2018)."""
    R = _as_matrix(matrix)
    T = len(R)
    return sum(_req(R, T, i, "AA") for i in range(1, T + 1)) / T


def online_performance(matrix: MatrixLike) -> list[float]:
    """OP_t = (1/t) Σ_{i≤t} R[t,i] for t = 1..T: mean over the tasks seen so far."""
    R = _as_matrix(matrix)
    return [sum(_req(R, t, i, "OP") for i in range(1, t + 1)) / t for t in range(1, len(R) + 1)]


def average_incremental_accuracy(matrix: MatrixLike) -> float:
    """AIA = (1/T) Σ_t OP_t (Rebuffi et al. 2017, iCaRL; Douillard et al. 2020)."""
    op = online_performance(matrix)
    return sum(op) / len(op)


def backward_transfer(matrix: MatrixLike) -> float | None:
    """BWT = (1/(T−1)) Σ_{i<T} (R[T,i] − R[i,i]) (GEM, Lopez-Paz & Ranzato 2017); None if T = 1."""
    R = _as_matrix(matrix)
    T = len(R)
    if T < 2:
        return None
    return sum(_req(R, T, i, "BWT") - _req(R, i, i, "BWT") for i in range(1, T)) / (T - 1)


def forgetting(matrix: MatrixLike) -> float | None:
    """F = (1/(T−1)) Σ_{i<T} (max_{l∈{i..T−1}} R[l,i] − R[T,i]) (Chaudhry et al. 2018, RWalk).

    The max runs over the rows after task i was learned up to the one before last, so a
    task whose score peaks after later tasks is measured from its peak: F ≠ −BWT in
    general. None if T = 1.
    """
    R = _as_matrix(matrix)
    T = len(R)
    if T < 2:
        return None
    total = 0.0
    for i in range(1, T):
        best = max(_req(R, t, i, "F") for t in range(i, T))
        total += best - _req(R, T, i, "F")
    return total / (T - 1)


def forward_transfer(matrix: MatrixLike, zero_shot: Sequence[Any] | np.ndarray | None) -> float | None:
    """FWT = (1/(T−1)) Σ_{i=2..T} (R[i−1,i] − b_i) (GEM, Lopez-Paz & Ranzato 2017).

    None if T = 1, if there is no zero-shot row b, or if any needed upper-diagonal
    entry R[i−1,i] or b_i (i ≥ 2) is missing: an undefined value, not 0.
    """
    R = _as_matrix(matrix)
    T = len(R)
    b = _as_row(zero_shot, T)
    if T < 2 or b is None:
        return None
    terms: list[float] = []
    for i in range(2, T + 1):
        r, bi = R[i - 2][i - 1], b[i - 1]
        if r is None or bi is None:
            return None
        terms.append(r - bi)
    return sum(terms) / (T - 1)


def compute_metrics(matrix: MatrixLike,
                    zero_shot: Sequence[Any] | np.ndarray | None = None) -> dict[str, Any]:
    """All metrics as a JSON-ready dict {"AA","BWT","FWT","F","AIA","OP"}; None where undefined.

    Values are plain Python floats, not rounded.
    """
    R = _as_matrix(matrix)
    b = _as_row(zero_shot, len(R))
    return {
        "AA": average_accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R, b),
        "F": forgetting(R),
        "AIA": average_incremental_accuracy(R),
        "OP": online_performance(R),
    }


def forward_transfer_vs_alone(matrix: MatrixLike, alone: Sequence[Any]) -> float | None:
    """FWT_alone = (1/(T−1)) Σ_{i=2..T} (R[i,i] − P_i), P_i the score on task i of an adapter trained
    on task i alone (the PerTaskFT reference, `cl-flat train --reference per_task`): how much
    learning the earlier tasks first helps (> 0) or hinders (< 0) learning task i. Task 1 is left
    out: it is trained alone in both. None if T = 1 or a needed score is missing."""
    R = _as_matrix(matrix)
    P = _as_row(alone, len(R))
    if len(R) < 2 or P is None:
        return None
    terms = [(R[i][i], P[i]) for i in range(1, len(R))]
    if any(r is None or p is None for r, p in terms):
        return None
    return sum(r - p for r, p in terms) / (len(R) - 1)


def gap_to_joint(matrix: MatrixLike, joint: Sequence[Any]) -> float | None:
    """Gap = mean_i J_i − AA, J_i the score on task i of one adapter trained on all tasks' data
    jointly (the multi-task upper bound, `--reference joint`). None if a score is missing."""
    J = _as_row(joint, len(_as_matrix(matrix)))
    if J is None or any(j is None for j in J):
        return None
    return sum(J) / len(J) - average_accuracy(matrix)


def probe_drift(zero_shot: Score, after_each_task: Sequence[Score]) -> dict[str, Any]:
    """One probe p (never trained) scored s_0 = P[0, p] before training and s_t = P[t, p] after tasks 1..t:
    drift_t = s_t − s_0, final_drift = s_T − s_0 (< 0: the sequence cost general ability the probe measures).
    A missing score (None) makes the differences that need it None."""
    s0, scores = score(zero_shot), [score(v) for v in after_each_task]
    drift = [None if s0 is None or s is None else s - s0 for s in scores]
    return {"zero_shot": s0, "after_each_task": scores, "drift": drift, "final_drift": drift[-1] if drift else None}


def probe_metrics(names: Sequence[str], zero_shot: Sequence[Score], rows: Sequence[Sequence[Score]]
                  ) -> dict[str, Any]:
    """metrics.json's "probes": {probe: probe_drift(...)} for each probe (`zero_shot`: P[0, ·]; `rows`: P[t, ·],
    t = 1..T) and "mean_final_drift" = (1/K) Σ_p final_drift_p over the K probes (None if K = 0 or one is None).
    Probes are never part of AA, BWT, FWT, F or AIA."""
    per = {name: probe_drift(zero_shot[k], [row[k] for row in rows]) for k, name in enumerate(names)}
    finals = [entry["final_drift"] for entry in per.values()]
    mean = sum(finals) / len(finals) if finals and None not in finals else None
    return {"probes": per, "mean_final_drift": mean}


# the scalar metrics of compute_metrics, in the order every table shows them (OP is a curve)
METRICS = ("AA", "BWT", "FWT", "F", "AIA")
# reference run kind (`cl-flat train --reference KIND`) -> (the key of the measure it allows, the measure)
REFERENCE_MEASURES = {"per_task": ("FWT_alone", forward_transfer_vs_alone), "joint": ("gap_joint", gap_to_joint)}

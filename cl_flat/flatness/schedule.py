"""Schedules over a task's T updates, t = 0..T−1: the first update gets the start value, the last
exactly the end value, whatever T (and so whatever the world size)."""

from __future__ import annotations

import math


def ramp_factor(kind: str, step: int, total_steps: int) -> float:
    """A ramp from 0 at t = 0 to exactly 1 at the last update t = T−1: cosine ½(1 − cos(π t/(T−1))),
    linear t/(T−1), constant 1; T = 1 gives 1."""
    if kind == "constant" or total_steps <= 1:
        return 1.0
    progress = min(step / (total_steps - 1), 1.0)
    return progress if kind == "linear" else 0.5 * (1 - math.cos(math.pi * progress))

"""Schedules over a task's T updates, t = 0..T−1: the learning-rate factor of `training.lr_scheduler`,
and the ramps of the flatness methods (the first update gets the start value, the last exactly the end
value, whatever T, and so whatever the world size)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")  # training.lr_scheduler
RAMPS = ("cosine", "linear", "constant")  # the flatness ramps (flat_lora.ramp)


def ramp_factor(kind: str, step: int, total_steps: int) -> float:
    """A ramp from 0 at t = 0 to exactly 1 at the last update t = T−1: cosine ½(1 − cos(π t/(T−1))),
    linear t/(T−1), constant 1; T = 1 gives 1."""
    if kind == "constant" or total_steps <= 1:
        return 1.0
    progress = min(step / (total_steps - 1), 1.0)
    return progress if kind == "linear" else 0.5 * (1 - math.cos(math.pi * progress))


def lr_factor(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at update `step` (0-based): linear warm-up to 1 over `warmup`
    updates, then constant, linear decay to 0, or half-cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor

"""LPF-SGD: low-pass filtering SGD, a Monte-Carlo gradient of the Gaussian-smoothed loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.noise import (
    SCOPES,
    NoiseBuffers,
    compact_scale,
    compact_scales,
    frozen_targets,
    noisy_mean_gradient,
)
from cl_flat.schedules import ramp_factor


def lpf_radius(gamma0: float, alpha: float, step: int, total_steps: int) -> float:
    """γ_t = γ0·(α/2·(1 − cos(π t/(T−1))) + 1) for t = 0..T−1: γ0 at the first update, exactly
    (α+1)·γ0 at the last (the cosine ramp of `schedule`; T = 1 gives (α+1)·γ0)."""
    return gamma0 * (alpha * ramp_factor("cosine", step, total_steps) + 1)


class LpfSgdConfig(Strict):
    method: Literal["lpf_sgd"]
    scope: Literal[SCOPES] = "full"
    noise_std: float = Field(default=0.0005, ge=0, description="γ0, the initial radius")
    radius_growth: float = Field(default=6.0, ge=0, description="α: γ_T = (α+1)·γ0")


@register("lpf_sgd", LpfSgdConfig)
class LpfSgd(FlatnessMethod):
    """LPF-SGD: gradient at filter-wise Gaussian noise whose radius grows over the task.

    Bisla et al., "Low-Pass Filtering SGD for Recovering Flat Optima in the Deep Learning
    Optimization Landscape", AISTATS 2022:

        g = (1/N) Σ_{i=1..N} ∇L(θ + ε_i; B_i),   ε_i,jk ~ N(0, (γ_t‖W_j,:‖₂)²),
        γ_t = γ0·(α/2·(1 − cos(π t/(T−1))) + 1),  t = 0..T−1 the update index, α = radius_growth,

    i.e. filter-wise noise (rows = output channels) whose radius grows from γ0 at the first update
    to exactly (α+1)·γ0 at the last (the paper's schedule runs t over [0, T]; over the T updates of a
    task that would stop one step short of the end radius). γ is a standard deviation per row,
    as in the authors' code (the paper writes the smoothing kernel's covariance as γ²).
    One noisy pass per micro-batch, fresh noise per micro-batch (key: seed, update, rank,
    micro-batch, tensor name); no clean pass. `scope`: lora = the current adapter's A, B (row norms
    of A and B, in place, restored from a copy); full = A, B and the frozen W0 of every adapted layer
    (functionally: W0 is never written); base = W0 only. Several ranks: each rank draws its own
    noise; the applied gradient is the all-reduced mean (an N·W-sample estimate).
    """

    formula = "g = (1/N) Σ_i ∇L(θ+ε_i; B_i), ε ~ N(0, (γ_t‖W_i,:‖)²), γ_t = γ0(α/2(1−cos(πt/(T−1)))+1)"
    versus_notes = ("some write-ups give ε ~ N(0, γ_t·‖W_i,:‖) (a variance); implemented: γ_t·‖W_i,:‖ as the standard "
                    "deviation, as in the LPF-SGD authors' code, so the noise scales with the weights")

    def __init__(self, config: LpfSgdConfig):
        super().__init__(config)
        self.targets = []
        self.buffers = NoiseBuffers()

    def begin_task(self, model):
        self.buffers.clear()
        self.targets = frozen_targets(model, "adapted") if self.config.scope in ("full", "base") else []

    def window(self, ctx, micro_batches):
        c = self.config
        gamma = lpf_radius(c.noise_std, c.radius_growth, ctx.step, ctx.total_steps)
        frozen = [(t, compact_scale("lpf_sgd", t.weight, gamma, rows=t.rows())) for t in self.targets]
        params = ctx.params if c.scope in ("lora", "full") else {}
        trainable = list(zip(params, params.values(), compact_scales("lpf_sgd", list(params.values()), gamma)))
        return {"loss": noisy_mean_gradient(ctx, micro_batches, frozen, trainable, self.buffers), "radius": gamma}

"""Flat-LoRA: random weight perturbation of the merged weight, at the cost of one pass."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.noise import NoiseBuffers, compact_scale, frozen_targets, noisy_mean_gradient
from cl_flat.schedules import RAMPS, ramp_factor


class FlatLoraConfig(Strict):
    method: Literal["flat_lora"]
    noise_std: float = Field(default=0.05, ge=0)
    ramp: Literal[RAMPS] = "cosine"


@register("flat_lora", FlatLoraConfig)
class FlatLora(FlatnessMethod):
    """Flat-LoRA: one pass with row-scaled noise on the merged weight W' = W0 + s·BA, ramped 0 → 1.

    Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", ICML 2025:
    the expected loss over random perturbations of the merged weight W' = W0 + Σ_k s_k B_k A_k (all
    active adapters: the frozen earlier ones are part of the effective weight), one pass per micro-batch:

        g = (1/N) Σ_{i=1..N} ∇_{A,B} L(W' + ε_i; B_i),   ε_i,jk ~ N(0, (f_t·σ/√n·‖W'_j,:‖₂)²),

    n = the row length (input features), rows = output channels, f_t = ramp(t) rising 0 → 1 over the
    task's T updates (cosine ½(1 − cos(π t/(T−1))), linear t/(T−1), or constant 1; f = 1 at the last
    update t = T−1). T is the task's real number of updates, whatever the world size (unlike the
    reference code, whose ramp never reaches 1 on several GPUs). ε is added functionally to the W0
    path of each adapted layer (x·(W0+ε)ᵀ + Σ s_k B_k A_k x = x·(W'+ε)ᵀ; the gradient w.r.t. A, B is
    the same wherever ε enters); nothing is written, nothing weight-sized is kept. The row norms of
    W' are computed once per update without grad. Fresh noise per micro-batch (key: seed, update,
    rank, micro-batch, layer name). Several ranks: each rank draws its own noise; the applied gradient
    is the all-reduced mean.
    """

    formula = "g = (1/N) Σ_i ∇L(W'+ε_i; B_i), ε ~ N(0, (ramp(t)·σ/√n·‖W'_j,:‖)²), W' = W0 + s·BA"

    def __init__(self, config: FlatLoraConfig):
        super().__init__(config)
        self.targets = []
        self.buffers = NoiseBuffers()

    def begin_task(self, model):
        self.buffers.clear()
        self.targets = frozen_targets(model, "adapted")

    def window(self, ctx, micro_batches):
        factor = ramp_factor(self.config.ramp, ctx.step, ctx.total_steps)
        sigma = self.config.noise_std * factor
        frozen = [(t, compact_scale("flat_lora", t.weight, sigma, rows=t.reference_rows("flat_lora")))
                  for t in self.targets]
        return {"loss": noisy_mean_gradient(ctx, micro_batches, frozen, [], self.buffers), "ramp": factor}

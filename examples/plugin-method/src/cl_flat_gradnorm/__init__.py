"""Gradient-norm penalty as a cl-flat flatness method, in one file outside the cl-flat package.

Zhao, Zhang and Hu, "Penalizing Gradient Norm for Efficiently Improving Generalization in Deep
Learning", ICML 2022: minimise L(θ) + λ‖∇L(θ)‖. Its gradient, with the Hessian-vector product taken
by a finite difference of step r along the normalised gradient, is

    g = (1 − α)·g₀ + α·g₁,   g₀ = ∇L(θ),   g₁ = ∇L(θ + r·g₀/‖g₀‖),   α = λ/r,

(α = 1 is SAM with radius r). Over a window of N micro-batches both gradients are means over the N
micro-batches; θ is the current task's adapter (frozen weights are never perturbed). Both gradients
are probes; the update's gradient is *computed* and handed to the engine with `apply_gradient`,
so DeepSpeed still reduces it over ranks, clips it and steps the optimizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness import FlatnessMethod, register


class GradNormConfig(Strict):
    method: Literal["gradnorm"]
    alpha: float = Field(default=0.8, ge=0, le=1, description="α = λ/r, the weight of the perturbed gradient")
    r: float = Field(default=0.01, gt=0, description="finite-difference step along g₀/‖g₀‖")


def mean_probe(ctx, micro_batches) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(mean loss, mean gradient) over the micro-batches, as probes (no `.grad` touched)."""
    losses, total = [], None
    for batch in micro_batches:
        loss, grads = ctx.probe(batch)
        losses.append(loss)
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    n = len(micro_batches)
    return torch.stack(losses).float().mean(), [t / n for t in total]


@register("gradnorm", GradNormConfig)
class GradNorm(FlatnessMethod):
    """Gradient-norm penalty (Zhao et al., ICML 2022) by a finite difference: a first-order flatness term."""

    formula = "g = (1−α)·∇L(θ) + α·∇L(θ + r·g₀/‖g₀‖), g₀ = ∇L(θ)"

    def window(self, ctx, micro_batches):
        params = list(ctx.params.values())
        loss, clean = mean_probe(ctx, micro_batches)
        wide = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in clean]  # bf16 adapters: fp32 norms
        norm = torch.linalg.vector_norm(torch.stack([w.norm() for w in wide]))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():  # the trainable adapter only, restored from `saved`
            for p, w in zip(params, wide):
                p.add_((w * (self.config.r / (norm + 1e-12))).to(p.dtype))
        try:
            perturbed_loss, perturbed = mean_probe(ctx, micro_batches)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        a = self.config.alpha
        ctx.apply_gradient([(1 - a) * g0 + a * g1 for g0, g1 in zip(clean, perturbed)], last=True)
        return {"loss": loss, "perturbed_loss": perturbed_loss, "grad_norm_clean": norm}

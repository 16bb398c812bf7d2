"""GSAM: SAM's perturbed gradient minus a fraction of the clean gradient's orthogonal part."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.sam import KeptGradients, dot, mean_probe, probe_at, sam_perturbation
from cl_flat.precision import global_norm


class GsamConfig(Strict):
    method: Literal["gsam"]
    rho: float = Field(default=0.05, ge=0)
    alpha: float = Field(default=0.1, ge=0, description="weight of the clean gradient's part orthogonal to g_p")
    adaptive: bool = False
    eta: float = Field(default=0.01, ge=0, description="ASAM's T = |θ| + eta (adaptive only)")


@register("gsam", GsamConfig)
class Gsam(FlatnessMethod):
    """GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022) on the current adapter.

        g = (1/N) Σ_i ∇L(θ; B_i),   ε = ρ·g/‖g‖,   g_p = ∇L(θ + ε; B_N),
        g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p,   update gradient = g_p − α·g_⊥.

    Descending g_p − α·g_⊥ minimises the perturbed loss while the −α·g_⊥ part (orthogonal to g_p, so it
    leaves the perturbed loss unchanged to first order) lowers the surrogate gap L(θ+ε) − L(θ). Inner
    products and norms are global over the adapter's tensors, as in the authors' code. Window of N
    micro-batches: g over all N, g_p on the last (the SAM convention of this tool); `adaptive` takes ASAM's
    ε = ρ·T²g/‖Tg‖, T = |θ| + η. The authors also decay ρ with the learning rate; here ρ is constant
    (the lr schedule stays the engine's). Every pass is a probe; the update's gradient is computed and
    handed over with `apply_gradient` (the engine reduces, clips and steps it). Several ranks: each rank
    computes its own ε and g_p − α·g_⊥ from its micro-batches; the applied gradient is their mean.
    """

    formula = "g = ∇L(θ+ε; B_N) − α·g_⊥, ε = ρ·g₀/‖g₀‖, g₀ = (1/N) Σ_i ∇L(θ; B_i), g_⊥ = g₀ − ⟨g₀,g_p⟩/‖g_p‖²·g_p"
    versus_notes = "ρ is constant over a task (the GSAM code ties ρ_t to the lr schedule)"

    def __init__(self, config: GsamConfig):
        super().__init__(config)
        self.kept = KeptGradients(1)  # g, kept through the perturbed pass

    def begin_task(self, model):
        self.kept.clear()

    def window(self, ctx, micro_batches):
        c = self.config
        params = list(ctx.params.values())
        [clean] = self.kept(params)
        loss = mean_probe(ctx, micro_batches, clean)
        eps = sam_perturbation(params, clean, c.rho, adaptive=c.adaptive, per_tensor=False, eta=c.eta)
        eps_norm = global_norm(eps)
        adv_loss, perturbed = probe_at(ctx, micro_batches[-1], eps)
        projection = dot(clean, perturbed) / (dot(perturbed, perturbed) + 1e-24)
        orthogonal = torch._foreach_sub(clean, torch._foreach_mul(perturbed, projection))
        ctx.apply_gradient(torch._foreach_sub(perturbed, torch._foreach_mul(orthogonal, c.alpha)), last=True)
        return {"loss": loss, "adv_loss": adv_loss.float(),
                "eps_norm": eps_norm, "orthogonal_norm": global_norm(orthogonal)}

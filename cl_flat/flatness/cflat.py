"""C-Flat: SAM's zeroth-order sharpness plus λ times the first-order flatness (the gradient norm's maximum)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.sam import KeptGradients, sam_perturbation, summed_probes
from cl_flat.precision import global_norm


class CFlatConfig(Strict):
    method: Literal["cflat"]
    rho: float = Field(default=0.2, ge=0, description="ρ: the radius of all three perturbations (authors' default)")
    lamb: float = Field(default=0.2, ge=0, description="λ: weight of the first-order flatness term (authors' --lamb)")
    interval: int = Field(default=1, ge=1, description="k: C-Flat on every k-th update, the plain gradient between")


@register("cflat", CFlatConfig)
class CFlat(FlatnessMethod):
    """C-Flat (Bian et al., "Make Continual Learning Stronger via C-Flat", NeurIPS 2024) on the current adapter.

    Objective: min_θ L(θ) + R⁰_ρ(θ) + λ·R¹_ρ(θ), with R⁰_ρ = max_{‖ε‖≤ρ} L(θ+ε) − L(θ) (SAM's sharpness)
    and R¹_ρ = ρ·max_{‖ε‖≤ρ} ‖∇L(θ+ε)‖ (first-order flatness). Its gradient, as the authors' code
    (github.com/WanNaa/C-Flat, optims/c_flat.py, `C_Flat.step`) computes it with GAM's finite differences:

        g₀ = ∇L(θ),  ε₀ = ρ·g₀/‖g₀‖,  g₁ = ∇L(θ + ε₀)                  (∇(L + R⁰) ≈ g₁)
        ε₁ = ρ·(g₁ − g₀)/‖g₁ − g₀‖,   g₂ = ∇L(θ + ε₁)                  ((g₁ − g₀)/ρ ≈ H g₀/‖g₀‖ = ∇‖∇L‖)
        ε₂ = ρ·g₂/‖g₂‖,               g₃ = ∇L(θ + ε₁ + ε₂)             (g₃ − g₂ ≈ ρ·∇‖∇L‖(θ + ε₁) = ∇R¹)
        update gradient = g₁ + λ·(g₃ − g₂)

    4 forward/backward passes per update with one micro-batch (the authors' "three additional gradient
    computations"); with N micro-batches N + 3: the tool's SAM conventions give g₀ = (1/N) Σ_i ∇L(θ; B_i) (the
    window mean, for ε₀) and take g₁, g₂, g₃ on the last micro-batch B_N; the finite difference for ε₁
    subtracts B_N's own clean gradient ∇L(θ; B_N), not the window mean, so that g₁ − ∇L(θ; B_N) is B_N's
    Hessian times ε₀ (a one-batch estimate of the window's H·g₀/‖g₀‖) and no batch-to-batch noise
    (N = 1: exactly the authors'). Norms are global over the adapter's tensors, ‖·‖ + 1e-12 in the
    divisions (the authors' perturb_eps), one ρ for all three steps and ρ, λ = 0.2 by default, as in their
    code (`main.py`). The authors' `adaptive` flag (applied inconsistently there: to ε₁ only) is not offered.
    `interval: k` is a cheaper schedule: the C-Flat gradient at updates t ≡ 0 (mod k) of a task, the plain
    window mean (N passes) in between, (N + 3/k) passes on average; C-Flat++ (Li et al., arXiv 2508.18860)
    likewise applies the flatness step selectively to cut its cost (its own selection rule is not
    reproduced here). The schedule reads the update index, so the method keeps no state. Every C-Flat pass
    is a probe; the gradient is handed over with `apply_gradient`. Several ranks: each rank computes its own
    ε's and g₁ + λ(g₃ − g₂) from its micro-batches; the applied gradient is their mean.
    """

    formula = ("g = g₁ + λ(g₃ − g₂); g₁ = ∇L(θ+ε₀; B_N), ε₀ = ρg₀/‖g₀‖, g₀ = (1/N)Σ_i ∇L(θ; B_i); "
               "g₂ = ∇L(θ+ε₁), ε₁ = ρd/‖d‖, d = g₁ − ∇L(θ; B_N); g₃ = ∇L(θ+ε₁+ρg₂/‖g₂‖)")
    versus_notes = ("the authors' code runs all four passes on one batch: here ε₀ comes from the window mean and "
                    "g₁…g₃ and the finite difference from the last micro-batch (the same at N = 1); no `adaptive`")

    def __init__(self, config: CFlatConfig):
        super().__init__(config)
        # θ's saved copy (first the window's sum), ∇L(θ; B_N), g₁, g₂ (then g₃ − g₂): each kept through a forward
        self.kept = KeptGradients(4)

    def begin_task(self, model):
        self.kept.clear()

    def window(self, ctx, micro_batches):
        c = self.config
        n = len(micro_batches)
        if ctx.step % c.interval:
            losses = [ctx.accumulate(batch, 1 / n, last=i == n - 1) for i, batch in enumerate(micro_batches)]
            return {"loss": torch.stack(losses).float().mean(), "cflat_update": 0.0}
        params = list(ctx.params.values())
        saved, last, g1, g2 = self.kept(params)
        losses = summed_probes(ctx, micro_batches[:-1], saved) if n > 1 else []  # in θ's buffer until θ is saved
        loss, grads = ctx.probe(micro_batches[-1])
        losses.append(loss)
        torch._foreach_copy_(last, grads)
        del grads
        if n > 1:  # the window's mean
            torch._foreach_add_(saved, last)
            torch._foreach_div_(saved, n)
        eps0 = sam_perturbation(params, saved if n > 1 else last, c.rho, adaptive=False, per_tensor=False)
        torch._foreach_copy_(saved, [p.detach() for p in params])
        try:
            with torch.no_grad():
                torch._foreach_add_(params, [e.to(p.dtype) for p, e in zip(params, eps0)])  # θ + ε₀
            del eps0
            adv_loss, grads = ctx.probe(micro_batches[-1])
            torch._foreach_copy_(g1, grads)
            del grads
            torch._foreach_sub_(last, g1)
            torch._foreach_neg_(last)  # d = g₁ − ∇L(θ; B_N)
            eps1 = sam_perturbation(params, last, c.rho, adaptive=False, per_tensor=False)
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
                torch._foreach_add_(params, [e.to(p.dtype) for p, e in zip(params, eps1)])  # θ + ε₁
            del eps1
            _, grads = ctx.probe(micro_batches[-1])
            torch._foreach_copy_(g2, grads)
            del grads
            eps2 = sam_perturbation(params, g2, c.rho, adaptive=False, per_tensor=False)
            with torch.no_grad():
                torch._foreach_add_(params, [e.to(p.dtype) for p, e in zip(params, eps2)])  # θ + ε₁ + ε₂
            del eps2
            _, grads = ctx.probe(micro_batches[-1])
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)  # θ bit for bit
        torch._foreach_sub_(g2, grads)
        del grads
        torch._foreach_neg_(g2)  # g₃ − g₂
        first_order_norm = global_norm(g2)
        torch._foreach_add_(g1, g2, alpha=c.lamb)  # the update: g₁ + λ(g₃ − g₂)
        ctx.apply_gradient(g1, last=True)
        return {"loss": torch.stack(losses).float().mean(), "adv_loss": adv_loss.float(),
                "first_order_norm": first_order_norm, "cflat_update": 1.0}

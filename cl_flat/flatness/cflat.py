"""C-Flat: SAM's zeroth-order sharpness plus λ times the first-order flatness (the gradient norm's maximum)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.sam import moved_by, sam_perturbation, wide


class CFlatConfig(Strict):
    method: Literal["cflat"]
    rho: float = Field(default=0.2, ge=0, description="ρ: the radius of all three perturbations (authors' default)")
    lamb: float = Field(default=0.2, ge=0, description="λ: weight of the first-order flatness term (authors' --lamb)")
    interval: int = Field(default=1, ge=1, description="k: C-Flat on every k-th update, the plain gradient between")


def _norm(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)).float())


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

    def window(self, ctx, micro_batches):
        c = self.config
        n = len(micro_batches)
        if ctx.step % c.interval:
            losses = [ctx.accumulate(batch, 1 / n, last=i == n - 1) for i, batch in enumerate(micro_batches)]
            return {"loss": torch.stack(losses).float().mean(), "cflat_update": 0.0}
        params = list(ctx.params.values())
        losses, total, last = [], None, None
        for batch in micro_batches:
            loss, grads = ctx.probe(batch)
            losses.append(loss)
            if total is None:
                total = [wide(g) for g in grads]  # N = 1: `last` itself, divided by 1 below (exact)
            else:
                torch._foreach_add_(total, grads)
            last = grads
        torch._foreach_div_(total, n)
        eps0 = sam_perturbation(params, total, c.rho, adaptive=False, per_tensor=False)
        del total  # free before the next forward (CPU heap fragmentation, see sam.Sam.window)
        with moved_by(params, eps0):
            del eps0
            adv_loss, g1 = ctx.probe(micro_batches[-1])
        diff = torch._foreach_sub([wide(g) for g in g1], last)
        del last
        eps1 = sam_perturbation(params, diff, c.rho, adaptive=False, per_tensor=False)
        del diff
        with moved_by(params, eps1):
            del eps1
            _, g2 = ctx.probe(micro_batches[-1])
            eps2 = sam_perturbation(params, g2, c.rho, adaptive=False, per_tensor=False)
            with moved_by(params, eps2):  # θ + ε₁ + ε₂
                del eps2
                _, g3 = ctx.probe(micro_batches[-1])
        first_order = [wide(g) for g in g3]  # g₃ itself in fp32: its own probe's tensors, changed in place
        del g3
        torch._foreach_sub_(first_order, g2)
        del g2
        update = torch._foreach_add([wide(g) for g in g1], first_order, alpha=c.lamb)
        ctx.apply_gradient(update, last=True)
        return {"loss": torch.stack(losses).float().mean(), "adv_loss": adv_loss.float(),
                "first_order_norm": _norm(first_order), "cflat_update": 1.0}

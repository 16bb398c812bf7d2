"""SAM and ASAM on the current task's adapter (SAM on LoRA's A and B only)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.precision import global_norm, wide


def sam_perturbation(params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, *,
                     adaptive: bool, per_tensor: bool, eta: float = 0.0) -> list[torch.Tensor]:
    """ε for SAM (ε = ρ g/‖g‖) or ASAM (ε = ρ T²g/‖Tg‖, T = |w| + eta), computed in fp32 (or the
    parameters' wider dtype). `per_tensor` normalises each tensor by its own norm instead of the global one.
    Multi-tensor ops throughout (a few per update, not a few per tensor)."""
    if not grads:
        return []
    g = [wide(x) for x in grads]  # a no-op for fp32 gradients
    if adaptive:
        scales = torch._foreach_abs([wide(p.detach()) for p in params])
        torch._foreach_add_(scales, eta)
        scaled = torch._foreach_mul(scales, g)
        numerator = torch._foreach_mul(scales, scaled)  # T²g
    else:
        scaled = numerator = g
    norms = torch._foreach_norm(scaled)
    if per_tensor:
        coefficients = torch._foreach_reciprocal(torch._foreach_add(norms, 1e-12))
        torch._foreach_mul_(coefficients, rho)
        return torch._foreach_mul(numerator, coefficients)
    total = torch.linalg.vector_norm(torch.stack(norms))
    return torch._foreach_mul(numerator, rho / (total + 1e-12))


class SamConfig(Strict):
    method: Literal["sam"]
    rho: float = Field(default=0.05, ge=0)
    adaptive: bool = False
    eta: float = Field(default=0.01, ge=0, description="ASAM's T = |θ| + eta (adaptive only)")
    norm: Literal["global", "per_tensor"] = "global"


class KeptGradients:
    """Adapter-sized fp32 (or wider) buffers for gradients that must outlive a forward, allocated once per task
    and reused by every update. Why: on CPU, small tensors allocated during a backward and kept through the
    next forward pin the freed activation memory around them, and the heap grows by up to a pass's
    activations with every such pass; a probe's gradients are copied here and freed instead. A cache, not
    state: nothing to checkpoint."""

    def __init__(self, sets: int):
        self.sets = sets
        self.buffers: list[list[torch.Tensor]] | None = None

    def clear(self) -> None:
        self.buffers = None

    def __call__(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        if self.buffers is None or [b.shape for b in self.buffers[0]] != [p.shape for p in params]:
            self.buffers = [[torch.empty(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                             for p in params] for _ in range(self.sets)]
        return self.buffers


def summed_probes(ctx, micro_batches, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each micro-batch's loss over the window, as probes (no `.grad`, no communication), with
    Σ_i ∇L(θ; B_i) written into `out` (buffers of `KeptGradients`: the probes' own tensors are dropped)."""
    losses = []
    for i, batch in enumerate(micro_batches):
        loss, grads = ctx.probe(batch)
        losses.append(loss)
        (torch._foreach_add_ if i else torch._foreach_copy_)(out, grads)
        del grads  # before the next forward
    return losses


def mean_probe(ctx, micro_batches, out: list[torch.Tensor]) -> torch.Tensor:
    """The mean loss over the window, as probes, with the mean gradient (1/N) Σ_i ∇L(θ; B_i) written into `out`."""
    losses = summed_probes(ctx, micro_batches, out)
    torch._foreach_div_(out, len(micro_batches))
    return torch.stack(losses).float().mean()


@contextmanager
def moved_by(params: list[torch.Tensor], eps: list[torch.Tensor]):
    """θ + ε for the block: the trainable adapter moved in place, then restored bit for bit from a copy
    (θ·1, exact, as one multi-tensor op)."""
    saved = torch._foreach_mul([p.detach() for p in params], 1.0)
    with torch.no_grad():
        torch._foreach_add_(params, [e if e.dtype == p.dtype else e.to(p.dtype) for p, e in zip(params, eps)])
    del eps  # the caller may free its ε before the block's forward
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


def probe_at(ctx, batch, eps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(L, ∇L) at θ + ε on `batch` (θ: the trainable adapter, restored after)."""
    with moved_by(list(ctx.params.values()), eps):
        return ctx.probe(batch)


def flat(xs: list[torch.Tensor]) -> torch.Tensor:
    """All tensors of the adapter as one vector (one concatenation), in fp32 or wider."""
    return wide(torch.cat([x.reshape(-1) for x in xs]))


def dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """⟨x, y⟩ over all tensors of the adapter, in fp32 or wider (two concatenations and one dot)."""
    x, y = flat(xs), flat(ys)
    dtype = torch.promote_types(x.dtype, y.dtype)
    return torch.dot(x.to(dtype), y.to(dtype))


@register("sam", SamConfig)
class Sam(FlatnessMethod):
    """SAM (Foret et al., ICLR 2021) / ASAM (Kwon et al., ICML 2021) on the current adapter.

    g = ∇L(θ + ε; B_N) with ε = ρ g₀/‖g₀‖ (ASAM: ε = ρ T²g₀/‖T g₀‖, T = |θ| + η), where
    g₀ = Σ_{i=1..N} ∇L(θ; B_i) is the clean gradient summed over the N micro-batches of the
    update window and θ is the current task's LoRA (A, B); frozen weights are never perturbed.
    Window semantics (as distributed SAM implementations do): ε from the whole window, the adversarial
    gradient from the last micro-batch B_N only. Clean passes are probes (no .grad, no
    communication); θ is perturbed in place and restored bit for bit from a saved copy.
    Several ranks: each rank computes ε from its own g₀ (as distributed SAM implementations
    do); the applied gradient is the all-reduced mean of the ranks' adversarial gradients.
    `norm: per_tensor` normalises A and B separately (each tensor by its own norm).
    ASAM's T = |θ| + η (η = `eta`, 0.01 as in the ASAM authors' code; the paper writes T = |θ|): with
    η = 0 a fresh IncLoRA adapter (B = 0) gets ε = 0 exactly, since ε_A ∝ |A|²g_A with g_A = 0 at
    B = 0 and ε_B ∝ |B|² = 0, so its first update would be the plain gradient. The perturbation is
    T²g (the ASAM paper's maximiser of the T⁻¹-scaled ball), not the T·g that some write-ups give.
    """

    formula = "g = ∇L(θ+ε; B_N), ε = ρ·g₀/‖g₀‖ (adaptive: ρ·T²g₀/‖Tg₀‖, T=|θ|+η), g₀ = Σ_i ∇L(θ; B_i)"
    versus_notes = ("some write-ups give ASAM's ε = ρ·|W|g/‖|W|g‖ (T once); implemented: ρ·T²g/‖Tg‖ as in the ASAM "
                    "paper and code, the exact maximiser of the linearised loss over ‖T⁻¹ε‖ ≤ ρ")

    def __init__(self, config: SamConfig):
        super().__init__(config)
        self.kept = KeptGradients(1)  # the window's sum, kept through its later passes

    def begin_task(self, model):
        self.kept.clear()

    def window(self, ctx, micro_batches):
        params = list(ctx.params.values())
        [clean] = self.kept(params)
        losses = summed_probes(ctx, micro_batches, clean)
        eps = sam_perturbation(params, clean, self.config.rho, adaptive=self.config.adaptive,
                               per_tensor=self.config.norm == "per_tensor", eta=self.config.eta)
        eps_norm = global_norm(eps)
        with moved_by(params, eps):  # the trainable adapter only
            del eps
            adversarial = ctx.accumulate(micro_batches[-1], 1, last=True)
        return {"loss": torch.stack(losses).float().mean(), "adv_loss": adversarial.float(),
                "eps_norm": eps_norm}

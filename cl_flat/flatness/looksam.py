"""LookSAM: the SAM gradient every k updates, and its stored orthogonal part reused in between."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.sam import KeptGradients, dot, mean_probe, probe_at, sam_perturbation
from cl_flat.precision import global_norm


class LookSamConfig(Strict):
    method: Literal["looksam"]
    rho: float = Field(default=0.05, ge=0)
    interval: int = Field(default=5, ge=1, description="k: the SAM gradient every k updates")
    alpha: float = Field(default=0.7, ge=0, description="weight of the reused orthogonal part")


@register("looksam", LookSamConfig)
class LookSam(FlatnessMethod):
    """LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022).

    With g = (1/N) Σ_i ∇L(θ; B_i) the clean window mean, at updates t ≡ 0 (mod k) of the task:

        g_s = ∇L(θ + ρ·g/‖g‖; B_N),   g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g,   update gradient = g_s,

    storing g_v (the part of the SAM gradient orthogonal to the clean one, which changes slowly); at
    the other updates, one clean pass per micro-batch and

        update gradient = g + α·(‖g‖/‖g_v‖)·g_v.

    Cost ≈ (1 + 1/k) passes per update. The SAM conventions of this tool (ε from the window mean, the
    perturbed gradient on the last micro-batch). g_v is per rank (each rank's own ε and g_s) and is the
    method's state: kept in in-task checkpoints, restarted at each task (the first update of a task is
    a SAM update, t = 0). Every pass is a probe; the gradient is handed over with `apply_gradient`.
    `reference_update` builds a fresh method, so it equals training at the SAM updates; pass it
    `method=` (one instance for the whole task) to replay the updates in between too.
    """

    formula = "t mod k = 0: g_s = ∇L(θ+ρg/‖g‖; B_N), g_v = g_s − ⟨g_s,g⟩/‖g‖²·g; else g + α‖g‖/‖g_v‖·g_v"

    def __init__(self, config: LookSamConfig):
        super().__init__(config)
        self.orthogonal: list[torch.Tensor] | None = None
        self.kept = KeptGradients(1)  # g, kept through the SAM update's perturbed pass

    def begin_task(self, model):
        self.orthogonal = None
        self.kept.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"orthogonal": self.orthogonal}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.orthogonal = state["orthogonal"]

    def window(self, ctx, micro_batches):
        c = self.config
        params = list(ctx.params.values())
        [clean] = self.kept(params)
        loss = mean_probe(ctx, micro_batches, clean)
        if ctx.step % c.interval == 0 or self.orthogonal is None:
            eps = sam_perturbation(params, clean, c.rho, adaptive=False, per_tensor=False)
            adv_loss, sam_grad = probe_at(ctx, micro_batches[-1], eps)
            projection = dot(sam_grad, clean) / (dot(clean, clean) + 1e-24)
            self.orthogonal = torch._foreach_sub(sam_grad, torch._foreach_mul(clean, projection))
            ctx.apply_gradient(sam_grad, last=True)
            return {"loss": loss, "adv_loss": adv_loss.float(), "sam_update": 1.0}
        scale = c.alpha * global_norm(clean) / (global_norm(self.orthogonal) + 1e-12)
        orthogonal = [v if v.dtype == g.dtype else v.to(g.dtype) for g, v in zip(clean, self.orthogonal)]
        ctx.apply_gradient(torch._foreach_add(clean, torch._foreach_mul(orthogonal, scale)), last=True)
        return {"loss": loss, "sam_update": 0.0}

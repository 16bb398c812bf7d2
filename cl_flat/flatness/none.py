"""Plain training through the method interface."""

from __future__ import annotations

from typing import Literal

import torch

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register


class NoneConfig(Strict):
    method: Literal["none"]


@register("none", NoneConfig)
class Plain(FlatnessMethod):
    """Plain training, no flatness term.

    g = (1/N) Σ_i ∇L(θ; B_i) over the N micro-batches of the update (the ordinary
    gradient-accumulation mean); several ranks are averaged by the all-reduce."""

    formula = "g = (1/N) Σ_i ∇L(θ; B_i)"

    def window(self, ctx, micro_batches):
        n = len(micro_batches)
        losses = [ctx.accumulate(batch, 1 / n, last=i == n - 1) for i, batch in enumerate(micro_batches)]
        return {"loss": torch.stack(losses).float().mean()}

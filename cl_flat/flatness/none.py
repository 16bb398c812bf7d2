"""Plain training through the method interface."""

from __future__ import annotations

from cl_flat.config import NoneMethod
from cl_flat.flatness.base import FlatnessMethod, register


@register
class Plain(FlatnessMethod):
    """Plain training, no flatness term.

    g = (1/N) Σ_i ∇L(θ; B_i) over the N micro-batches of the update (the ordinary
    gradient-accumulation mean); several ranks are averaged by the all-reduce."""

    name = "none"
    config_class = NoneMethod
    formula = "g = (1/N) Σ_i ∇L(θ; B_i)"

    def window(self, ctx, micro_batches):
        n = len(micro_batches)
        total = 0.0
        for i, batch in enumerate(micro_batches):
            loss = ctx.loss(batch)
            ctx.backward(loss / n, last=i == n - 1)
            total += loss.item()
        return {"loss": total / n}

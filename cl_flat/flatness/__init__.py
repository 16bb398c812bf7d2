"""Flatness methods: one small registered class per method, plus the public helpers.

`reference_update` (contract) is the plain-torch gradient one update applies; training runs
the same method code through a DeepSpeed-backed context, so it applies exactly this gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from cl_flat.flatness import none, sam  # noqa: F401  (registration)
from cl_flat.flatness.base import REGISTRY, FlatnessMethod, LossFn, StepContext, build_method


class TorchContext(StepContext):
    """StepContext over a plain module: `backward` is `loss.backward()` into `.grad`."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, **kwargs: Any):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(params, **kwargs)
        self.model = model
        self.loss_fn = loss_fn

    def loss(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()


def reference_update(config: BaseModel | dict, model: torch.nn.Module, micro_batches: list[Any], loss_fn: LossFn,
                     *, step: int = 0, total_steps: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The gradient one update of `config`'s method applies to each trainable parameter
    (before clipping and the optimizer), in plain torch, keyed by parameter name. Existing
    `.grad` values and all weights are left as they were."""
    method = build_method(config)
    ctx = TorchContext(model, loss_fn, step=step, total_steps=total_steps, seed=seed)
    saved_grads = {n: p.grad for n, p in ctx.params.items()}
    for p in ctx.params.values():
        p.grad = None
    try:
        method.window(ctx, list(micro_batches))
        return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in ctx.params.items()}
    finally:
        for n, p in ctx.params.items():
            p.grad = saved_grads[n]


__all__ = ["REGISTRY", "FlatnessMethod", "StepContext", "TorchContext", "build_method", "reference_update"]

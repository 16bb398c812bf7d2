"""`reference_update` (contract): in plain torch, the gradient one update of a method applies.

Training runs the same method code through a DeepSpeed-backed context (`cl_flat.train`), so it
applies exactly this gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from cl_flat.flatness.base import FlatnessMethod, LossFn, StepContext, build_method


class TorchContext(StepContext):
    """StepContext over a plain module: `backward` is `loss.backward()` into `.grad`."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, **kwargs: Any):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(params, **kwargs)
        self.model = model
        self.loss_fn = loss_fn

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def loss(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()


def reference_update(config: BaseModel | dict, model: torch.nn.Module, micro_batches: list[Any], loss_fn: LossFn,
                     *, step: int = 0, total_steps: int = 1, seed: int = 0, rank: int = 0,
                     world_size: int = 1, method: FlatnessMethod | None = None) -> dict[str, torch.Tensor]:
    """The gradient one update of `config`'s method applies to each trainable parameter
    (before clipping and the optimizer), in plain torch, keyed by parameter name. Existing
    `.grad` values and all weights are left as they were. By default the method is fresh (its task begins
    here), so per-task state such as RWP's Fisher EMA starts empty. `rank`/`world_size`: the rank
    whose share this is (noise is keyed by rank; RWP `parallel` splits the work by rank): the update
    of a W-rank run is the mean over r of reference_update(..., rank=r, world_size=W) on rank r's batches.
    `method`: one instance of `config`'s method carried over the updates of a task (rank r's own), so that
    its state (RWP's Fisher EMA, LookSAM's stored direction) evolves as in training; its `begin_task` is
    then the caller's."""
    if method is None:
        method = build_method(config)
        method.begin_task(model)
    ctx = TorchContext(model, loss_fn, step=step, total_steps=total_steps, seed=seed, rank=rank,
                       world_size=world_size)
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

"""The flatness-method interface: a method produces the gradient of one optimizer update.

A method sees a `StepContext`, never the engine. The context offers three operations:
- `loss(batch)`: forward of the plain module (no DeepSpeed hooks);
- `grads(loss)`: a *probe* gradient w.r.t. the trainable parameters (torch.autograd.grad):
  it touches no `.grad`, fires no DeepSpeed hook and is never communicated;
- `backward(loss, last)`: adds d(loss)/dθ to the gradient the update applies. In training this
  is `engine.backward` (DeepSpeed accumulates, reduces over ranks at `last`, clips, steps);
  in `reference_update` it is plain `loss.backward()`.
Methods run whole passes through `accumulate(batch, weight, last)` and `probe(batch)`, which
return detached values: the autograd graph of a pass is gone before the next forward starts.
(A graph kept alive into the next pass pins thousands of small allocations across the freed
activation memory; on CPU glibc then cannot reuse it, and a second pass in the same update
raises the peak resident memory. A probe's gradients do the same: a method that needs them after a
later forward copies them into buffers allocated for the task, `flatness.sam.KeptGradients`.)
A method whose update is a *computed* gradient (a combination of probe gradients: GSAM's g_p − α·g_⊥,
a projection) hands it over with `apply_gradient(grads, last)`, which adds exactly `grads` to the
update's gradient through the same `backward` (the surrogate loss Σ_k ⟨θ_k, g_k⟩ has gradient g), so
the engine still reduces, clips and steps it and `reference_update` stays exact.
A method's lifetime is explicit: the loop calls `begin_task(model)` once before the first update
of every task (state such as a Fisher estimate or the noise targets starts there), then
`window(ctx, micro_batches)` once per update.
Because both paths run the same method code, training applies exactly `reference_update`
(averaged over ranks by DeepSpeed's all-reduce). One exception, by design: `split_losses(batch,
split)` (the losses of a batch's first rows and of the rest from one forward) exists only where the
context has a row-splittable loss (training without O-LoRA's terms); RWP's `one_pass` uses it there,
and elsewhere (`reference_update`) computes the same gradient by its serial definition, two passes
on the halves; the equivalence tests hold the two equal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from cl_flat.config import TrainingSection, flatness_adapter
from cl_flat.registry import METHODS


class StepContext(ABC):
    """What one update may do. `step` is the 0-based update index within the task."""

    def __init__(self, params: dict[str, torch.nn.Parameter], *, step: int, total_steps: int, seed: int,
                 rank: int = 0, world_size: int = 1, split_loss_fn: Callable | None = None):
        self.params = params
        self.split_loss_fn = split_loss_fn
        self.step = step
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The plain module the passes run (never a DeepSpeed engine)."""

    @abstractmethod
    def loss(self, batch: Any) -> torch.Tensor: ...

    def split_losses(self, batch: Any, split: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L(batch[:split]), L(batch[split:])) from ONE forward (each the mean over its own
        targets), or None where this context's loss cannot be cut by rows (`split_loss_fn`
        absent: `reference_update`, or a loss with O-LoRA's terms); a method then runs the halves
        as two passes."""
        if self.split_loss_fn is None:
            return None
        return self.split_loss_fn(self.module, batch, split)

    def grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        params = list(self.params.values())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool) -> None: ...

    def accumulate(self, batch: Any, weight: float, *, last: bool) -> torch.Tensor:
        """One pass: adds weight·∇L(θ; batch) to the update's gradient; returns L detached."""
        loss = self.loss(batch)
        self.backward(loss if weight == 1 else loss * weight, last=last)
        return loss.detach()

    def probe(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One probe pass: (L detached, ∇L w.r.t. the trainable parameters), no `.grad` touched."""
        loss = self.loss(batch)
        return loss.detach(), self.grads(loss)

    def mean_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean of `tensors` over the ranks of training, for state a method keeps identical on every
        rank (Bi-LoRA's auxiliary adapter). A plain-torch context is one rank's share: unchanged."""
        return tensors

    def apply_gradient(self, grads: list[torch.Tensor], *, last: bool) -> None:
        """Adds `grads` (one tensor per trainable parameter, in `params` order) to the update's gradient,
        as `backward` adds ∇L: through the surrogate Σ_k ⟨θ_k, g_k⟩, whose gradient w.r.t. θ_k is g_k
        exactly (no forward of the model; the engine reduces, clips and steps it like any gradient)."""
        params = list(self.params.values())
        if len(grads) != len(params):
            raise ValueError(f"apply_gradient: {len(grads)} gradients for {len(params)} trainable parameters")
        # ⟨θ, g⟩ over the concatenated tensors: a constant number of ops whatever the number of tensors
        surrogate = torch.dot(torch.cat([p.reshape(-1) for p in params]),
                              torch.cat([g.detach().reshape(-1).to(p.dtype) for p, g in zip(params, grads)]))
        self.backward(surrogate, last=last)


class FlatnessMethod(ABC):
    """One registered method: built from its config block, produces one update's gradient.

    A method is one file: its config class (a `Strict` model with `method: Literal[name]`) beside its
    class, which `@register(name, ConfigClass)` makes a method (`name`, `config_class` are set there)."""

    name: ClassVar[str]
    config_class: ClassVar[type[BaseModel]]
    formula: ClassVar[str]  # one line for `cl-flat methods`
    # where common write-ups of the method differ from the published form: what is implemented and why, one line
    versus_notes: ClassVar[str] = ""

    def __init__(self, config: BaseModel):
        self.config = config

    def check(self, training: TrainingSection) -> list[str]:
        """Problems with this method under these training settings (unsupported combinations); empty if fine."""
        return []

    def begin_task(self, model: torch.nn.Module) -> None:
        """Called once before the first update of a task with the plain module to be trained
        (its new adapter trainable, everything else frozen); resets per-task state."""

    def state_dict(self) -> dict[str, Any]:
        """The state an in-task checkpoint must keep to continue the task exactly (this rank's;
        caches that are rebuilt on demand are not state). It may hold live references to tensors the
        method updates in place: the loop deep-copies it before every update (a dropped update is
        rolled back with `load_state_dict(copy)`), and checkpoints serialise it."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` after `begin_task`, when a task resumes from a checkpoint."""

    @abstractmethod
    def window(self, ctx: StepContext, micro_batches: list[Any]) -> dict[str, float]:
        """Run the passes of one update over its micro-batches; return stats for the log
        (at least `loss`, the mean clean or first-pass loss): 0-dim tensors left on the device
        (the loop brings all of an update's values to the host in one transfer, so a method never
        synchronises the host itself) or host floats."""


register = METHODS.register


def build_method(config: BaseModel | dict) -> FlatnessMethod:
    """The method of a flatness config block (a dict is validated first)."""
    if isinstance(config, dict):
        config = flatness_adapter().validate_python(config)
    return METHODS.get(config.method).cls(config)


LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

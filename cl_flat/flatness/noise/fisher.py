"""Row Fisher for the `fisher` noise type: an EMA of squared gradients, per row, normalised.

m-RWP's Fisher variant keeps Fisher_ij ← λ·Fisher_ij + (∂L/∂W_ij)² and use
F_i = Σ_j Fisher_ij. The sum is linear, so one number per row suffices:

    F_i ← λ·F_i + ‖∂L/∂W_i,:‖²        (λ = `fisher_decay`, L = a clean micro-batch's mean loss)

and the noise uses F̃_i = F_i / mean_k F_k, the estimate divided by its mean over the tensor's
rows. Why normalised: ‖∂L/∂W_i,:‖² of a mean loss falls with the number of target tokens in a
micro-batch and grows as 1/(1−λ) with the EMA, so a raw η would mean something different at every
batch size and decay; F̃ has mean 1 on every layer, so η = 1 halves the noise variance of a row
of average Fisher whatever the batch. (A tensor whose gradient is still zero, such as A while
B = 0 at the start of an IncLoRA task, has F̃ = 0: the `lpf_sgd` noise.)

The row gradient is never stored, also for a frozen W0 (which has no .grad): for a linear map
y = W x over the micro-batch's tokens t, ∂L/∂W_i,: = Σ_t δ_ti·x_tᵀ with δ_t = ∂L/∂y_t, so a forward
hook keeps the layer input X (tokens × in) and a hook on the output's gradient forms Δᵀ X
(rows × in, one layer at a time, discarded at once) and keeps its squared row norms. For W0 of an
adapted layer δ is taken at the LoRA layer's output (= the base output's gradient). With gradient
accumulation the estimate is the mean over the window's clean micro-batches (the square of their
mean would need a weight-sized buffer per layer). A frozen layer whose output carries no gradient
in the clean pass (layers upstream of every adapter, with `all_linear`) keeps F̃ = 0.

`fisher_estimate: per_token` instead folds in the per-token empirical Fisher Σ_t ‖∂ℓ_t/∂W_i,:‖² =
Σ_t δ_ti²‖x_t‖² (each token's gradient is δ_t x_tᵀ); it needs one float per token instead of X.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

FISHER_ESTIMATES = ("minibatch", "per_token")


class RowFisher:
    """F_i ← decay·F_i + F̂_i per named tensor; `rows` gives F_i / mean_k F_k (module docstring)."""

    def __init__(self, decay: float, estimate: str = "minibatch"):
        if estimate not in FISHER_ESTIMATES:
            raise ValueError(f"unknown Fisher estimate {estimate!r}; expected one of {FISHER_ESTIMATES}")
        self.decay = decay
        self.estimate = estimate
        self.state: dict[str, torch.Tensor] = {}
        self._window: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.state, self._window = {}, {}

    def rows(self, name: str) -> torch.Tensor | None:
        """F̃ of tensor `name` (mean 1 over its rows; zeros while its estimate is zero), or None."""
        raw = self.state.get(name)
        if raw is None:
            return None
        mean = raw.mean()
        return raw / mean if mean > 0 else torch.zeros_like(raw)

    @contextmanager
    def capture(self, modules: dict[str, nn.Module], weight: float) -> Iterator[None]:
        """Accumulate weight·F̂_i for each named linear-like module during the block's forward and
        backward (`weight` undoes the squared loss scaling and averages over passes)."""
        handles = []
        per_token = self.estimate == "per_token"

        def hook(name):
            def forward_hook(module, inputs, output):
                if not (torch.is_tensor(output) and output.requires_grad):
                    return
                x = inputs[0].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
                kept = x.square().sum(-1) if per_token else x

                def on_grad(delta):
                    delta = delta.detach().reshape(-1, delta.shape[-1]).to(kept.dtype)
                    if per_token:  # Σ_t δ_ti²‖x_t‖²
                        rows = delta.square().t().mv(kept)
                    else:  # ‖Σ_t δ_ti x_t‖²: the row norms of ∂L/∂W = Δᵀ X
                        rows = (delta.t() @ kept).square().sum(-1)
                    rows = rows * weight
                    self._window[name] = self._window[name] + rows if name in self._window else rows

                output.register_hook(on_grad)
            return forward_hook

        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def update(self) -> None:
        """Fold the window's estimate into the EMA."""
        for name, rows in self._window.items():
            old = self.state.get(name)
            self.state[name] = rows if old is None else self.decay * old + rows
        self._window = {}


def param_module(model: nn.Module, name: str) -> nn.Module | None:
    """The nn.Linear owning parameter `name` as its weight (None if there is none)."""
    if not name.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(name[: -len(".weight")])
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None

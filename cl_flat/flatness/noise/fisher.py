"""Row Fisher for the `fisher` noise type: an EMA of the per-row empirical Fisher.

F_i ← λ·F_i + F̂_i (λ = `fisher_decay`, an EMA of squared gradients summed over the row, as in
m-RWP's Fisher variant). F̂_i is the per-token empirical Fisher of row i of a linear map y = W x,
captured in the clean passes without forming any weight gradient:
F̂_i = Σ_t δ_ti²·‖x_t‖², where t runs over the tokens of the micro-batch, x_t is the layer input and
δ_t = ∂L/∂y_t (L = the unscaled micro-batch loss); it is Σ_t ‖∂ℓ_t/∂W_i,:‖² (each token's gradient
is the outer product δ_t x_tᵀ), averaged over the clean micro-batches of the window. Cost: a forward
hook storing ‖x_t‖² (one float per token) and one tokens×rows product in backward, per layer. For a
frozen W0 of an adapted layer δ is taken at the LoRA layer's output (= the base output's gradient);
a frozen layer whose output carries no gradient in the clean pass (only layers upstream of every
trainable adapter, with `all_linear`) keeps F = 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class RowFisher:
    """EMA of the per-row empirical Fisher: F_i ← decay·F_i + F̂_i (see the module docstring)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.state: dict[str, torch.Tensor] = {}
        self._window: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.state, self._window = {}, {}

    def rows(self, name: str) -> torch.Tensor | None:
        return self.state.get(name)

    @contextmanager
    def capture(self, modules: dict[str, nn.Module], weight: float) -> Iterator[None]:
        """Accumulate weight·Σ_t δ_ti²‖x_t‖² for each named linear-like module during the block's
        forward and backward (`weight` undoes the loss scaling and averages over passes)."""
        handles = []

        def hook(name):
            def forward_hook(module, inputs, output):
                if not (torch.is_tensor(output) and output.requires_grad):
                    return
                x = inputs[0].detach()
                x_sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
                x_sq = x_sq.square().reshape(-1)

                def on_grad(delta):
                    rows = delta.detach().to(x_sq.dtype).square().reshape(-1, delta.shape[-1]).t().mv(x_sq) * weight
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

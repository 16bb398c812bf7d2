"""LoRA geometry shared by the noise methods and the loss landscape.

- which layers are LoRA layers: peft's `LoraLayer` modules (`lora_layers`);
- every weight is seen as [out, in] (rows = output channels): `nn.Linear` as stored, GPT-2's
  `Conv1D` (stored [in, out]) as a transposed view (`linear_weight`, `stored_transposed`);
- `row_norms(W)` = ‖W_i,:‖₂ per output row, one value per row, in fp32 or wider;
- `merged_row_norms(layer)` = ‖W'_i,:‖₂ of the merged weight W' = W0 + Σ_k s_k B_k A_k over the
  layer's active adapters, computed analytically (no weight-sized temporary).
"""

from __future__ import annotations

import torch
from torch import nn


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer of `model`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` or a 2-D GPT-2 `Conv1D`: the layers with an [out, in] weight view."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and module.weight.dim() == 2)


def stored_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as [in, out] (GPT-2's Conv1D)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in [out, in] orientation: nn.Linear as is, GPT-2's Conv1D ([in, out]) as a view."""
    if not is_linear(module):
        raise TypeError(f"expected an nn.Linear or Conv1D layer, not {type(module).__name__}")
    return module.weight.t() if stored_transposed(module) else module.weight


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i,:‖₂ for each row i (dim 0; a 0-d tensor is one row), shape [rows], in fp32 or wider."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    flat = weight.detach().reshape(weight.shape[0] if weight.dim() else 1, -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=dtype)


def merged_row_norms(layer: nn.Module, base_rows: torch.Tensor | None = None) -> torch.Tensor:
    """‖W'_i,:‖₂, shape [out], of W' = W0 + Σ_k s_k B_k A_k over the layer's active adapters, from
    ‖W'_i‖² = ‖W0_i‖² + 2⟨W0_i, (BA)_i⟩ + ‖(BA)_i‖² = ‖W0_i‖² + s⟨B_i, (2·W0Aᵀ + s·B·AAᵀ)_i⟩ with
    B = [s_k B_k], A = [A_k] stacked and s = 1 (one adapter: B = B_1, s = s_1, no scaled copy):
    O(out·in·r) flops, no weight-sized temporary, no grad, about a dozen ops. `base_rows`: ‖W0_i‖ if known."""
    w0 = linear_weight(layer.base_layer).detach()
    rows = row_norms(w0) if base_rows is None else base_rows.reshape(-1)
    names = [k for k in layer.active_adapters if k in layer.lora_A]
    if not names:
        return rows
    with torch.no_grad():
        if len(names) == 1:
            a, b, s = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight, float(layer.scaling[names[0]])
        else:
            a = torch.cat([layer.lora_A[k].weight for k in names])                                # [R, in]
            b = torch.cat([layer.lora_B[k].weight * layer.scaling[k] for k in names], 1)          # [out, R]
            s = 1.0
        a, b = a.detach().to(rows.dtype), b.detach().to(rows.dtype)
        cross = (w0 @ a.t().to(w0.dtype)).to(rows.dtype)                                       # W0Aᵀ [out, R]
        inner = torch.addmm(cross, b, a @ a.t(), beta=2.0, alpha=s)                          # 2·W0Aᵀ + s·B·AAᵀ
        squares = torch.add(rows.square(), (inner * b).sum(1), alpha=s)
    return squares.clamp_min(0).sqrt()

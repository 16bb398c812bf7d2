"""The noise families: the standard deviations S that ε = Z ⊙ S is drawn with.

`noise_scale` (contract) gives S as a matrix; internally S is kept compact (`Scale`: a scalar or
one value per row, times |W| for `gauss_element`) so nothing weight-sized is stored. Rows are
output channels (dim 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cl_flat.flatness.noise.keyed_normal import keyed_gaussian
from cl_flat.lora_layers import row_norms

NOISE_TYPES = ("gauss_standard", "gauss_matrix", "gauss_element", "lpf_sgd", "fisher", "flat_lora")


def per_row(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One value per row of `weight`, shaped [rows, 1, ...] to broadcast against it (0-d: a scalar)."""
    if not weight.dim():
        return values.reshape(())
    return values.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1))


@dataclass(frozen=True, eq=False)
class Scale:
    """S in compact form: S = factor (scalar or one value per row) · (|W| if elementwise)."""

    factor: torch.Tensor | float
    elementwise: bool = False

    def full(self, weight: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(weight.dtype, torch.float32)
        base = weight.detach().abs().to(dtype) if self.elementwise else torch.ones_like(weight, dtype=dtype)
        return base * self.factor

    def draw(self, weight: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """ε = Z ⊙ S in the weight's dtype and on its device (into `out` if given)."""
        return keyed_gaussian(weight, key, self.factor, elementwise=self.elementwise, add=False, out=out)

    def add_to(self, weight: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W + ε for the same key as `draw`, in one fused pass (into `out` if given)."""
        return keyed_gaussian(weight, key, self.factor, elementwise=self.elementwise, add=True, out=out)


def compact_scale(noise_type: str, weight: torch.Tensor, sigma: float, *, fisher_rows: torch.Tensor | None = None,
                  eta: float = 1.0, rows: torch.Tensor | None = None) -> Scale:
    """The `Scale` of `noise_type` for `weight`. `rows`: the row norms ‖W_i,:‖ the filter-wise
    types use (one per row; default: those of `weight`) — the merged weight's for `flat_lora` on W0."""
    if noise_type == "gauss_standard":
        return Scale(float(sigma))
    if noise_type == "gauss_element":
        return Scale(float(sigma), elementwise=True)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; expected one of {NOISE_TYPES}")
    rows = per_row(row_norms(weight) if rows is None else rows, weight)
    if noise_type == "gauss_matrix":
        return Scale(sigma * torch.linalg.vector_norm(rows))
    if noise_type == "lpf_sgd":
        return Scale(sigma * rows)
    if noise_type == "flat_lora":
        n = weight[0].numel() if weight.dim() else 1
        return Scale(rows * (sigma / math.sqrt(n)))
    # fisher: S_i = σ‖W_i‖ / √(1 + η F_i); no estimate yet means F = 0
    if fisher_rows is None:
        return Scale(sigma * rows)
    return Scale(sigma * rows / torch.sqrt(1.0 + eta * fisher_rows.to(rows.dtype).reshape(rows.shape)))


def _grouped_row_norms(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """`row_norms` of every weight, by one concatenation and one norm per row length (a LoRA adapter has
    about three: A's input widths and B's rank), not two ops per tensor; each row's norm is computed as
    `row_norms` computes it."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        width = w[0].numel() if w.dim() else 1
        groups.setdefault((width, w.dtype, w.device), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for (width, _, _), members in groups.items():
        flat = torch.cat([weights[i].detach().reshape(-1) for i in members]) if len(members) > 1 \
            else weights[members[0]].detach().reshape(-1)
        rows = row_norms(flat.view(-1, width))
        for i, part in zip(members, rows.split([weights[i].shape[0] if weights[i].dim() else 1 for i in members])):
            out[i] = part
    return out


def compact_scales(noise_type: str, weights: list[torch.Tensor], sigma: float) -> list[Scale]:
    """`compact_scale(noise_type, w, sigma)` for each of `weights` (a trainable adapter's tensors), in a few
    multi-tensor ops instead of a few per tensor. `fisher` (its F differs per tensor) goes tensor by tensor."""
    if noise_type in ("gauss_standard", "gauss_element") or noise_type not in NOISE_TYPES or noise_type == "fisher":
        return [compact_scale(noise_type, w, sigma) for w in weights]
    if not weights:
        return []
    rows = _grouped_row_norms(weights)
    if noise_type == "gauss_matrix":  # σ‖W‖_F = σ‖(‖W_i,:‖)_i‖
        return [Scale(f) for f in torch._foreach_mul(torch._foreach_norm(rows), sigma)]
    if noise_type == "lpf_sgd":
        factors = torch._foreach_mul(rows, sigma)
    else:  # flat_lora: σ/√n per row of length n
        factors = torch._foreach_mul(rows, [sigma / math.sqrt(w[0].numel() if w.dim() else 1) for w in weights])
    return [Scale(per_row(f, w)) for f, w in zip(factors, weights)]


def noise_scale(noise_type: str, weight: torch.Tensor, sigma: float, *, fisher_rows: torch.Tensor | None = None,
                eta: float = 1.0) -> torch.Tensor:
    """(contract) The matrix S of standard deviations (shape of `weight`, ≥ fp32) that `noise_type`
    draws ε = Z ⊙ S with. Rows are output channels (dim 0):
    gauss_standard S = σ; gauss_matrix S = σ‖W‖_F; gauss_element S = σ|W_ij|;
    lpf_sgd S_ij = σ‖W_i,:‖₂; fisher S_ij = σ‖W_i,:‖₂/√(1+ηF_i) (`fisher_rows` = F, one per row:
    training passes the row Fisher normalised to mean 1, `RowFisher.rows`; None = 0);
    flat_lora S_ij = σ‖W_i,:‖₂/√n with n the row length."""
    return compact_scale(noise_type, weight, sigma, fisher_rows=fisher_rows, eta=eta).full(weight)

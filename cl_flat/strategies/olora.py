"""O-LoRA (`lora.strategy: olora`): IncLoRA's adapter stack, plus a penalty that keeps the new
adapter's subspace orthogonal to the earlier ones.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP 2023
Findings. For the current task t, over every adapted layer:

    R = λ1 · Σ_layers Σ_{k<t} Σ_ij |(A_k A_tᵀ)_ij|  +  λ2 · Σ_layers (‖A_t‖_F + ‖B_t‖_F)

(λ1 = `lambda_orth`, λ2 = `lambda_l2`, the `lora` block's; a task may set its own in `tasks[i].lora`,
merged onto the run's when the config is read). The paper writes the orthogonality loss with squared
entries; the authors' trainer, implemented here as the released method ran, sums the absolute
entries of A_old A_newᵀ (A_old = the earlier adapters' A stacked, i.e. the sum over k) and adds
the plain, not squared, Frobenius norm of every new LoRA tensor. R is added to the loss of every pass of every
flatness method (a perturbed pass sees the perturbed A_t), so it enters each update's gradient
once, as in the authors' trainer; the earlier A_k are frozen and get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from cl_flat.adapters import AdapterStack
from cl_flat.config import LoraSection, Strict
from cl_flat.lora_layers import lora_layers
from cl_flat.registry import STRATEGIES
from cl_flat.strategies.inclora import IncLora


@dataclass(frozen=True, eq=False)
class OrthogonalPenalty:
    """R of the module docstring for the adapter `current` against `previous`, read from live
    parameters (so in-place perturbations and optimizer steps are seen)."""

    pairs: tuple[tuple[torch.Tensor, tuple[torch.Tensor, ...]], ...]  # (A_t, (A_k for k < t)) per layer
    new: tuple[torch.Tensor, ...]                                       # A_t and B_t of every layer
    lambda_orth: float
    lambda_l2: float

    @classmethod
    def of(cls, model: nn.Module, current: str, previous: list[str], lambda_orth: float,
           lambda_l2: float) -> OrthogonalPenalty:
        pairs, new = [], []
        for _, layer in lora_layers(model):
            if current not in layer.lora_A:
                continue
            a_t = layer.lora_A[current].weight
            pairs.append((a_t, tuple(layer.lora_A[k].weight for k in previous if k in layer.lora_A)))
            new += [a_t, layer.lora_B[current].weight]
        return cls(tuple(pairs), tuple(new), lambda_orth, lambda_l2)

    def orthogonality(self) -> torch.Tensor:
        """Σ_layers Σ_{k<t} Σ_ij |(A_k A_tᵀ)_ij| (0 for the first task)."""
        terms = [(a_k.float() @ a_t.float().t()).abs().sum() for a_t, olds in self.pairs for a_k in olds]
        return torch.stack(terms).sum() if terms else self._zero()

    def l2(self) -> torch.Tensor:
        """Σ over A_t and B_t of every layer of ‖·‖_F."""
        return torch.stack([p.float().norm() for p in self.new]).sum() if self.new else self._zero()

    def __call__(self, module: nn.Module | None = None) -> torch.Tensor:
        """λ1·orthogonality + λ2·l2 (a term whose λ is 0 is not computed)."""
        total = self._zero()
        if self.lambda_orth:
            total = total + self.lambda_orth * self.orthogonality()
        if self.lambda_l2:
            total = total + self.lambda_l2 * self.l2()
        return total

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """The two terms (unweighted), for the training log: 0-dim tensors on the device (the loop
        fetches them with the update's other values, in one transfer)."""
        return {"olora_orth": self.orthogonality(), "olora_l2": self.l2()}

    def _zero(self) -> torch.Tensor:
        device = self.new[0].device if self.new else "cpu"
        return torch.zeros((), device=device)


class OLoraConfig(LoraSection):
    """`lambda_orth`, `lambda_l2` (LoraSection's: every strategy accepts them) are R's λ1, λ2."""

    strategy: Literal["olora"] = "olora"


class OLoraWeights(Strict):
    """A task's own O-LoRA weights (tasks[i].lora); what it leaves out is the run-level value,
    filled in when the config is read (the `lora` block's, see `Strategy.task_config`)."""
    lambda_orth: float = Field(ge=0, description="olora: this task's weight of Σ|A_k A_tᵀ|")
    lambda_l2: float = Field(ge=0, description="olora: this task's weight of Σ (‖A_t‖_F + ‖B_t‖_F)")


@STRATEGIES.register("olora", OLoraConfig)
class OLora(IncLora):
    """IncLoRA plus R, the orthogonality (and L2) penalty of the new adapter against the earlier ones."""

    task_config = OLoraWeights  # O-LoRA's scripts/long.sh varies the λ by task

    @classmethod
    def check(cls, raw: dict[str, Any], chosen: Any) -> list[str]:
        """A task's λ only mean something under O-LoRA."""
        if chosen == cls.name:
            return []
        tasks = raw.get("tasks") if isinstance(raw.get("tasks"), list) else []
        return [f"tasks.{i}.lora: a task's lambda_orth / lambda_l2 are O-LoRA's weights; they need "
                f"lora.strategy: olora (this run: {chosen})"
                for i, task in enumerate(tasks) if isinstance(task, dict) and task.get("lora") is not None]

    def weights(self, index: int) -> OLoraWeights | OLoraConfig:
        """λ1, λ2 of task `index`: its own (tasks[i].lora, merged onto the run's) or the run's."""
        return self.config.tasks[index].lora or self.config.lora

    def loss_terms(self, stack: AdapterStack, index: int) -> OrthogonalPenalty:
        """R for task `index` against the stack's earlier adapters, with the task's λ."""
        weights = self.weights(index)
        return OrthogonalPenalty.of(stack.model, stack.current, stack.adapters[:-1], weights.lambda_orth,
                                    weights.lambda_l2)

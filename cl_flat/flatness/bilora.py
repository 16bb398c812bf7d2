"""Bi-LoRA: an auxiliary low-rank adapter carries SAM's perturbation and ascends in the same pass."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from cl_flat.config import Strict
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.lora_layers import lora_layers
from cl_flat.precision import wide
from cl_flat.seeding import keyed_generator

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (the paper's trainer: AdamW, same betas)


class BiLoraConfig(Strict):
    method: Literal["bilora"]
    rho: float = Field(default=0.05, ge=0, description="radius of the global ‖B₂A₂‖_F ball")
    rank: int = Field(default=8, ge=1, description="r₂: rank of the auxiliary adapter")
    lr: float = Field(default=5e-4, gt=0, description="η₂: the auxiliary adapter's ascent step (constant)")
    optimizer: Literal["adam", "sgd"] = Field(default="adam", description="the auxiliary adapter's ascent rule")


def product_norm(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """√Σ_l ‖B_l A_l‖²_F without forming any B_l A_l: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ), r×r matrices."""
    terms = [((bb.t() @ bb) * (aa @ aa.t())).sum() for aa, bb in zip(a, b)]
    return torch.stack(terms).sum().clamp_min(0).sqrt() if terms else torch.zeros(())


@register("bilora", BiLoraConfig)
class BiLora(FlatnessMethod):
    """Bi-LoRA: an auxiliary adapter ε = B₂A₂ ascends on the gradient of the pass the adapter descends on.

    Liu, Li, Huang, Yang, Huang, "Bi-LoRA: Efficient Sharpness-Aware Minimization for Fine-Tuning
    Large-Scale Models", ICLR 2026, arXiv 2508.19564. One pass per micro-batch.

    Every adapted layer computes with W = W0 + Σ_k s_k B_k A_k + B₂A₂ during training (paper Eq. 7),
    where (A₂, B₂) is an auxiliary adapter of rank r₂ held by the method. One forward/backward per
    micro-batch gives G = ∇_W L at (θ, ε = B₂A₂); the same backward yields both updates (Eq. 9):

        update gradient = (1/N) Σ_i ∇_θ L(θ, ε; B_i)         (the primary adapter descends: the engine's step)
        B₂ ← B₂ + η₂·step(G A₂ᵀ),  A₂ ← A₂ + η₂·step(B₂ᵀ G)  (the auxiliary ascends, on the same gradient)
        c = √Σ_l ‖B₂⁽ˡ⁾A₂⁽ˡ⁾‖²_F;  if c > ρ: A₂, B₂ ← √(ρ/c)·A₂, √(ρ/c)·B₂   (Eq. 10: global clipping)

    so ‖ε‖_F ≤ ρ over all adapted layers together (the paper's Appendix G prefers this global ball to a
    per-layer one, Table 5). The primary and auxiliary gradients are simultaneous: ε_{t+1} is built from
    G_t (Prop. 2: ⟨G_t, ε_{t+1} − ε_t⟩ ≥ 0), no second pass as in SAM.
    Choices, with their source:
    - ε = B₂A₂ enters unscaled (the paper folds LoRA's α/r into B and A, Eq. 1) and is clipped on the
      Frobenius norm of the product, global over every LoRA layer of the model (Eq. 10).
    - r₂ = 8 (Sec. 4.6 and App. J: "r₂ = 8 as a task-agnostic default"); ρ = 0.05 (App. R: GLUE and
      Llama 2; 0.1 on SuperGLUE and Qwen).
    - step: Adam ascent (`optimizer: adam`; β = (0.9, 0.999), ε = 1e-8, no weight decay, its own moments),
      since the paper trains both modules with one optimizer of the same learning rate (η₂ = η₁ = 5e-4,
      App. Q/R); `sgd` is Eq. 9 literally. Here η₂ is constant: the paper's shared optimizer also
      applied the lr warmup and cosine schedule to η₂ (the authors' code was not available to check).
    - initialisation as a LoRA adapter: B₂ = 0, A₂ ~ U(−1/√n, 1/√n) (n = input features), drawn from a
      generator keyed by (method seed, layer), identical on every rank; the first update is plain LoRA.
    - the auxiliary adapter lives in this method only: it is added to each LoRA layer's output by a
      forward hook attached during the update's passes (ε·x, no weight written), is never part of the
      engine, the saved adapters or evaluation, and is discarded at the end of the task (a new task
      starts a new one, as the paper removes it after training). It is method state: kept in in-task
      checkpoints with its Adam moments and rolled back with a dropped non-finite update.
    - several ranks: the auxiliary gradient is averaged over the ranks (one all-reduce) before the step,
      so every rank keeps the same ε, as one optimizer over the data-parallel gradient would.
    Logged: `eps_norm` = ‖ε‖_F (global) of the perturbation this update's gradient was taken at.
    """

    formula = ("g = (1/N) Σ_i ∇_θ L(θ, ε=B₂A₂; B_i); (A₂,B₂) += η₂·step(∇_{A₂,B₂} L) from the same pass, "
               "then scaled by √(ρ/c) if c = ‖B₂A₂‖_F (global) > ρ")
    versus_notes = ("η₂ is constant over a task (the paper's shared optimizer also warms up and decays it with "
                    "η₁); Adam moments of the auxiliary adapter are the method's own")

    def __init__(self, config: BiLoraConfig):
        super().__init__(config)
        self.layers: dict[str, torch.nn.Module] = {}
        self._reset()

    def _reset(self) -> None:
        self.aux: dict[str, torch.Tensor] = {}         # "<layer>.A", "<layer>.B" → leaf tensors
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self.t = 0

    def begin_task(self, model):
        self.layers = dict(lora_layers(model))
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        return {"aux": self.aux, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not state.get("aux"):
            self._reset()
            return
        self.aux = {k: v.detach().requires_grad_(True) for k, v in state["aux"].items()}
        self.exp_avg, self.exp_avg_sq, self.t = dict(state["exp_avg"]), dict(state["exp_avg_sq"]), int(state["t"])

    def _initialise(self, seed: int) -> None:
        """B₂ = 0, A₂ ~ U(−1/√n, 1/√n) per layer (LoRA's Kaiming-uniform init), keyed by (seed, layer)."""
        for name, layer in self.layers.items():
            weight = layer.get_base_layer().weight
            dtype = wide(weight).dtype
            n_in, n_out = layer.in_features, layer.out_features
            bound = 1 / math.sqrt(n_in)
            a = (torch.rand(self.config.rank, n_in, generator=keyed_generator(seed, "bilora", name),
                            dtype=torch.float64) * 2 - 1) * bound
            self.aux[f"{name}.A"] = a.to(weight.device, dtype).requires_grad_(True)
            self.aux[f"{name}.B"] = torch.zeros(n_out, self.config.rank, device=weight.device, dtype=dtype,
                                                requires_grad=True)

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        names = list(self.layers)
        return [self.aux[f"{n}.A"] for n in names], [self.aux[f"{n}.B"] for n in names]

    @contextmanager
    def _attached(self):
        """Each LoRA layer's output + x·A₂ᵀB₂ᵀ within the block (forward hooks, removed on exit)."""
        handles = []
        try:
            for name, layer in self.layers.items():
                def hook(module, args, output, _a=f"{name}.A", _b=f"{name}.B"):
                    x = args[0]
                    h = F.linear(x, self.aux[_a].to(x.dtype)).to(output.dtype)  # [..., r₂]
                    b = self.aux[_b].to(output.dtype)
                    if not output.is_contiguous():
                        return output + F.linear(h, b)
                    # added in place by one addmm: no output-sized temporary (on CPU, such temporaries
                    # between saved activations fragment the heap and raise the peak memory)
                    output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t())
                    return output

                handles.append(layer.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def ascend(self, grads: list[torch.Tensor]) -> None:
        """One ascent step of the auxiliary adapter on `grads` (its gradient, `aux` order, averaged over
        the ranks), then the global clipping into the ρ-ball. Public: the multi-rank replay of the tests
        applies it to the ranks' mean gradient."""
        c = self.config
        params = list(self.aux.values())
        with torch.no_grad():
            if c.optimizer == "sgd":
                torch._foreach_add_(params, grads, alpha=c.lr)
            else:
                self.t += 1
                keys = list(self.aux)
                for key, p in zip(keys, params):
                    if key not in self.exp_avg:
                        self.exp_avg[key], self.exp_avg_sq[key] = torch.zeros_like(p), torch.zeros_like(p)
                m = [self.exp_avg[k] for k in keys]
                v = [self.exp_avg_sq[k] for k in keys]
                beta1, beta2 = BETAS
                torch._foreach_lerp_(m, grads, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
                bias1, bias2 = 1 - beta1 ** self.t, 1 - beta2 ** self.t
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(bias2))
                torch._foreach_add_(denom, ADAM_EPS)
                torch._foreach_addcdiv_(params, m, denom, c.lr / bias1)  # + : ascent
            a, b = self.pairs()
            norm = product_norm(a, b)
            factor = torch.where(norm > c.rho, (c.rho / norm).sqrt(), torch.ones_like(norm))
            torch._foreach_mul_(params, factor)

    def window(self, ctx, micro_batches):
        if not self.layers:
            self.layers = dict(lora_layers(ctx.module))
        if not self.aux:
            self._initialise(ctx.seed)
        eps_norm = product_norm(*self.pairs()).detach()
        n = len(micro_batches)
        with self._attached():
            losses = [ctx.accumulate(batch, 1 / n, last=i == n - 1) for i, batch in enumerate(micro_batches)]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.aux.values()]
        for p in self.aux.values():
            p.grad = None
        self.ascend(ctx.mean_over_ranks(grads))
        return {"loss": torch.stack(losses).float().mean(), "eps_norm": eps_norm.float()}

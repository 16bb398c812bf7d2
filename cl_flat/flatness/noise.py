"""Noise families and how noise reaches the weights, for RWP, LPF-SGD and Flat-LoRA.

Every family draws ε = Z ⊙ S with Z ~ N(0, 1) a pure function of a key hashed from (run seed,
update, rank, micro-batch, tensor name) (`cl_flat.flatness.keyed_normal`: counter-based and fused
with W0 + ε on CPU, a seeded `normal_` on CUDA): the same key always gives the same ε, another key
another ε, and torch's global RNG is never touched. `noise_scale` (contract) gives S; internally S
is kept compact (a scalar or one value per row, times |W| for `gauss_element`) so nothing
weight-sized is stored.

Where noise goes:
- **frozen weights** (W0 of adapted layers, or every linear layer with `all_linear`): never
  written. While a noisy pass runs, the forward of each target layer is replaced by
  `_NoisyLinear`, an autograd function computing x·(W0+ε)ᵀ + b. It saves only the key
  (not ε, not x) and regenerates ε in backward for grad_x = δ·(W0+ε); W0 gets no gradient.
  Extra memory: one buffer of the largest layer, reused by every layer (`_Scratch`). Activation
  checkpointing that recomputes the forward inside the pass regenerates the same ε (the key
  is fixed per pass, not per call).
- **trainable LoRA A, B** of the current adapter: perturbed in place and restored exactly from
  a saved copy (adapter-sized, a persistent buffer per parameter) in a `finally` block, after
  the pass's backward.

Row Fisher (`fisher` noise type): F_i ← λ·F_i + F̂_i (λ = `fisher_decay`, the notes' EMA of squared
gradients, summed over the row). F̂_i is the per-token empirical Fisher of row i of a linear
map y = W x, captured in the clean passes without forming any weight gradient:
F̂_i = Σ_t δ_ti²·‖x_t‖², where t runs over the tokens of the micro-batch, x_t is the layer input and
δ_t = ∂L/∂y_t (L = the unscaled micro-batch loss); it is Σ_t ‖∂ℓ_t/∂W_i,:‖² (each token's gradient
is the outer product δ_t x_tᵀ), averaged over the clean micro-batches of the window. Cost: a forward
hook storing ‖x_t‖² (one float per token) and one tokens×rows product in backward, per layer. For a
frozen W0 of an adapted layer δ is taken at the LoRA layer's output (= the base output's gradient);
a frozen layer whose output carries no gradient in the clean pass (only layers upstream of every
trainable adapter, with `all_linear`) keeps F = 0.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from cl_flat.flatness.keyed_normal import keyed_gaussian, standard_normal

NOISE_TYPES = ("gauss_standard", "gauss_matrix", "gauss_element", "lpf_sgd", "fisher", "flat_lora")


# ---------------------------------------------------------------- scales (contract: noise_scale)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i,:‖₂ per row (rows = dim 0), shape [rows, 1, ...] (broadcastable to `weight`), in ≥ fp32."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    flat = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.detach().reshape(1, 1)
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=dtype)
    return norms.reshape(norms.shape + (1,) * max(weight.dim() - 1, 0)) if weight.dim() else norms.reshape(())


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
    """The `Scale` of `noise_type` for `weight`; `rows` may pass precomputed (cached) row norms."""
    if noise_type == "gauss_standard":
        return Scale(float(sigma))
    if noise_type == "gauss_element":
        return Scale(float(sigma), elementwise=True)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; expected one of {NOISE_TYPES}")
    rows = row_norms(weight) if rows is None else rows
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


def noise_scale(noise_type: str, weight: torch.Tensor, sigma: float, *, fisher_rows: torch.Tensor | None = None,
                eta: float = 1.0) -> torch.Tensor:
    """(contract) The matrix S of standard deviations (shape of `weight`, ≥ fp32) that `noise_type`
    draws ε = Z ⊙ S with. Rows are output channels (dim 0):
    gauss_standard S = σ; gauss_matrix S = σ‖W‖_F; gauss_element S = σ|W_ij|;
    lpf_sgd S_ij = σ‖W_i,:‖₂; fisher S_ij = σ‖W_i,:‖₂/√(1+ηF_i) (`fisher_rows` = F, one per row;
    None = 0); flat_lora S_ij = σ‖W_i,:‖₂/√n with n the row length."""
    return compact_scale(noise_type, weight, sigma, fisher_rows=fisher_rows, eta=eta).full(weight)


# ---------------------------------------------------------------- keys


def noise_key(*parts: Any) -> int:
    """A 63-bit generator seed from any parts (stable across processes, devices and runs)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_noise(weight: torch.Tensor, scale: Scale, key: int) -> torch.Tensor:
    """ε for `weight` under `key` (public so tests and checks can rebuild a pass's noise)."""
    return scale.draw(weight.detach(), key)


# ---------------------------------------------------------------- targets: which layers get noise


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in [out, in] orientation: nn.Linear as is, GPT-2's Conv1D ([in, out]) as a view."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
        return module.weight.t()
    raise TypeError(f"noise on frozen weights supports nn.Linear and Conv1D layers, not {type(module).__name__}")


@dataclass
class FrozenTarget:
    """A frozen linear layer that gets functional noise. `lora` is the peft LoRA layer it is the
    base of (None for a non-adapted layer); `grad_module` is where the Fisher hook reads δ."""

    name: str
    module: nn.Module
    lora: nn.Module | None
    _rows: torch.Tensor | None = field(default=None, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        return _linear_weight(self.module)

    @property
    def grad_module(self) -> nn.Module:
        return self.lora if self.lora is not None else self.module

    def rows(self) -> torch.Tensor:
        """‖W0_i,:‖ (cached: W0 never changes)."""
        if self._rows is None:
            self._rows = row_norms(self.weight)
        return self._rows

    def merged_rows(self) -> torch.Tensor:
        """‖W'_i,:‖ of the merged weight W' = W0 + Σ_k s_k B_k A_k over all active adapters, from
        ‖W'_i‖² = ‖W0_i‖² + 2⟨W0_i, (BA)_i⟩ + ‖(BA)_i‖² with B = [s_k B_k], A = [A_k] stacked:
        O(out·in·r) flops and no weight-sized temporary, no grad."""
        layer = self.lora
        names = [k for k in layer.active_adapters if k in layer.lora_A]
        rows = self.rows().reshape(-1)
        if not names:
            return rows.reshape(-1, 1)
        with torch.no_grad():
            a = torch.cat([layer.lora_A[k].weight for k in names]).to(rows.dtype)                     # [R, in]
            b = torch.cat([layer.lora_B[k].weight * layer.scaling[k] for k in names], 1).to(rows.dtype)  # [out, R]
            w0 = self.weight.detach()
            cross = (w0 @ a.t().to(w0.dtype)).to(rows.dtype)                                           # [out, R]
            sq = rows.square() + 2 * (b * cross).sum(1) + ((b @ (a @ a.t())) * b).sum(1)
        return sq.clamp_min(0).sqrt().reshape(-1, 1)


def frozen_targets(model: nn.Module, which: str = "adapted") -> list[FrozenTarget]:
    """`adapted`: the base layer of every peft LoRA layer; `all_linear`: every linear layer of the
    base model (LoRA A/B and the output head excluded). Merged LoRA layers are refused."""
    from peft.tuners.lora import LoraLayer

    lora_of = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if getattr(module, "merged", False):
                raise ValueError(f"{name}: merged LoRA layers cannot get functional noise; unmerge first")
            lora_of[f"{name}.base_layer"] = module
    if which == "adapted":
        names = list(lora_of)
    elif which == "all_linear":
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        names = [n for n, m in model.named_modules()
                 if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                 and ".lora_" not in f".{n}" and n.rsplit(".", 1)[-1] != "lm_head" and id(m.weight) not in embeddings]
    else:
        raise ValueError(f"unknown noise_targets {which!r}")
    targets = []
    for name in names:
        module = model.get_submodule(name)
        _linear_weight(module)  # type check
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(f"{name}: functional noise is for frozen layers, but it has trainable parameters")
        targets.append(FrozenTarget(name, module, lora_of.get(name)))
    return targets


# ---------------------------------------------------------------- applying noise to one pass


class _Scratch:
    """The buffer every frozen layer forms its W0 + ε in, in turn, and trainable parameters draw
    their ε in before the pass (one per device and dtype, sized for the largest tensor seen, kept
    for the process in `_SCRATCH`). Why: a fresh layer-sized temporary twice per layer and pass,
    freed between saved activations, fragmented the CPU heap (+6% peak resident memory) and
    touched fresh pages; each use ends before the next one starts (on CUDA, by stream order)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def reserve(self, weights: list[torch.Tensor]) -> "_Scratch":
        for w in weights:
            key = (w.device, w.dtype)
            if key not in self._buffers or self._buffers[key].numel() < w.numel():
                self._buffers[key] = torch.empty(w.numel(), device=w.device, dtype=w.dtype)
        return self

    def like(self, weight: torch.Tensor) -> torch.Tensor:
        return self._buffers[(weight.device, weight.dtype)][:weight.numel()].view(weight.shape)


_SCRATCH = _Scratch()


class _SavedCopies:
    """Persistent buffers for the copies of perturbed trainable parameters (one per parameter,
    dropped with it), for the same reason as `_Scratch`: no fresh allocations between passes."""

    def __init__(self) -> None:
        # keyed by id (tensors compare elementwise, so they cannot be dict keys); the weakref
        # tells a live entry from a dead parameter whose id was reused
        self._buffers: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def copy_of(self, param: torch.Tensor) -> torch.Tensor:
        entry = self._buffers.get(id(param))
        if entry is None or entry[0]() is not param or entry[1].shape != param.shape or entry[1].dtype != param.dtype:
            self._buffers = {k: v for k, v in self._buffers.items()  # drop dead and frozen ones
                             if (p := v[0]()) is not None and p.requires_grad}
            entry = (weakref.ref(param), torch.empty_like(param, memory_format=torch.contiguous_format))
            self._buffers[id(param)] = entry
        return entry[1].copy_(param.detach())


_SAVED = _SavedCopies()


class _FrozenNoise:
    """Regenerates W0 + ε for one layer and one pass from its key (into the pass's scratch buffer)."""

    def __init__(self, module: nn.Module, scale: Scale, key: int, scratch: _Scratch):
        self.module, self.scale, self.key, self.scratch = module, scale, key, scratch

    def perturbed_weight(self) -> torch.Tensor:
        weight = _linear_weight(self.module)
        return self.scale.add_to(weight, self.key, out=self.scratch.like(weight))


class _NoisyLinear(torch.autograd.Function):
    """y = x·(W0+ε)ᵀ + b with W0, b frozen; only the key is kept, ε is regenerated in backward
    (skipped when no gradient w.r.t. x is needed, e.g. the first layer's projections)."""

    @staticmethod
    def forward(ctx, x, bias, noise: _FrozenNoise):
        ctx.noise = noise
        return F.linear(x, noise.perturbed_weight(), bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad.matmul(ctx.noise.perturbed_weight()), None, None


@contextmanager
def _replaced_forward(module: nn.Module, forward) -> Iterator[None]:
    had = "forward" in vars(module)
    old = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


@contextmanager
def perturbed(frozen: list[tuple[FrozenTarget, Scale]], trainable: list[tuple[str, nn.Parameter, Scale]],
              key: tuple) -> Iterator[None]:
    """Within the block (run the noisy forward AND backward inside it): frozen targets compute with
    W0 + ε functionally, trainable parameters hold θ + ε in place. On exit the forwards are restored
    and the trainable parameters are copied back bit for bit. `key` = (seed, step, rank, micro-batch);
    each tensor's ε is keyed by `key` + its name."""
    saved = [_SAVED.copy_of(p) for _, p, _ in trainable]
    scratch = _SCRATCH.reserve([target.weight for target, _ in frozen] + [p for _, p, _ in trainable])
    with ExitStack() as stack:
        try:
            with torch.no_grad():
                for name, param, scale in trainable:
                    param.add_(scale.draw(param.detach(), noise_key(*key, name), out=scratch.like(param)))
            for target, scale in frozen:
                noise = _FrozenNoise(target.module, scale, noise_key(*key, target.name), scratch)
                bias = target.module.bias

                def forward(x, *args, _noise=noise, _bias=bias, **kwargs):
                    return _NoisyLinear.apply(x, _bias, _noise)

                stack.enter_context(_replaced_forward(target.module, forward))
            yield
        finally:
            with torch.no_grad():
                for (_, param, _), copy in zip(trainable, saved):
                    param.copy_(copy)


# ---------------------------------------------------------------- row Fisher


def noisy_mean_gradient(ctx, micro_batches: list, frozen: list, trainable: list) -> float:
    """One noisy pass per micro-batch with fresh noise each (key: seed, update, rank, micro-batch):
    applies g = (1/N) Σ_i ∇L(θ+ε_i; B_i); returns the mean noisy loss (one-pass methods)."""
    n = len(micro_batches)
    losses = []
    for i, batch in enumerate(micro_batches):
        with perturbed(frozen, trainable, (ctx.seed, ctx.step, ctx.rank, i)):
            losses.append(ctx.accumulate(batch, 1 / n, last=i == n - 1))
    return torch.stack(losses).float().mean().item()


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


# ---------------------------------------------------------------- helpers for the methods


def param_module(model: nn.Module, name: str) -> nn.Module | None:
    """The linear-like module owning parameter `name` as its weight (None if there is none)."""
    if not name.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(name[: -len(".weight")])
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


class TargetCache:
    """Frozen targets of one model (with their cached W0 row norms), rebuilt when the model or the
    selection changes or a new task starts (the update index goes back)."""

    def __init__(self) -> None:
        self._model: weakref.ref | None = None
        self._which, self._step = None, -1
        self._targets: list[FrozenTarget] = []

    def get(self, model: nn.Module, which: str, step: int) -> list[FrozenTarget]:
        if self._model is None or self._model() is not model or which != self._which or step < self._step:
            self._model, self._which, self._targets = weakref.ref(model), which, frozen_targets(model, which)
        self._step = step
        return self._targets


__all__ = ["NOISE_TYPES", "FrozenTarget", "RowFisher", "Scale", "TargetCache", "compact_scale",
           "frozen_targets", "keyed_noise", "noise_key", "noise_scale", "param_module",
           "perturbed", "row_norms", "standard_normal"]

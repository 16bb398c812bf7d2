"""How noise reaches the weights in one pass, without writing anything frozen.

- **frozen weights** (W0 of adapted layers, or every linear layer with `all_linear`): never
  written. While a noisy pass runs, the forward of each target layer is replaced by
  `_NoisyLinear`, an autograd function computing x·(W0+ε)ᵀ + b. It saves only the key
  (not ε, not x) and regenerates ε in backward for grad_x = δ·(W0+ε); W0 gets no gradient.
  Extra memory: one buffer of the largest layer, reused by every layer in turn. Activation
  checkpointing that recomputes the forward inside the pass regenerates the same ε (the key
  is fixed per pass, not per call).
- **trainable LoRA A, B** of the current adapter: perturbed in place and restored exactly from
  a saved copy in a `finally` block, after the pass's backward.
The buffers (`NoiseBuffers`) belong to the method that draws the noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from cl_flat.flatness.noise.scales import Scale
from cl_flat.lora_layers import is_linear, linear_weight, lora_layers, merged_row_norms, row_norms
from cl_flat.seeding import noise_key


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
        return linear_weight(self.module)

    @property
    def grad_module(self) -> nn.Module:
        return self.lora if self.lora is not None else self.module

    def rows(self) -> torch.Tensor:
        """‖W0_i,:‖ (cached: W0 never changes)."""
        if self._rows is None:
            self._rows = row_norms(self.weight)
        return self._rows

    def merged_rows(self) -> torch.Tensor:
        """‖W'_i,:‖ of the weight the layer computes with, W' = W0 + Σ_k s_k B_k A_k (W0 without adapters)."""
        return self.rows() if self.lora is None else merged_row_norms(self.lora, self.rows())

    def reference_rows(self, noise_type: str) -> torch.Tensor:
        """The row norms a filter-wise noise type scales with: the merged weight's for `flat_lora`
        (Flat-LoRA's noise, the same formula as the method `flat_lora`), W0's otherwise."""
        return self.merged_rows() if noise_type == "flat_lora" else self.rows()


SCOPES = ("lora", "full", "base")  # what noise reaches: the current adapter, adapter + frozen W0, W0 only
NOISE_TARGETS = ("adapted", "all_linear")  # which frozen W0 (`frozen_targets`)


def frozen_targets(model: nn.Module, which: str = "adapted") -> list[FrozenTarget]:
    """`adapted`: the base layer of every peft LoRA layer; `all_linear`: every linear layer of the
    base model (LoRA A/B and the output head excluded). Merged LoRA layers are refused."""
    lora_of = {}
    for name, layer in lora_layers(model):
        if getattr(layer, "merged", False):
            raise ValueError(f"{name}: merged LoRA layers cannot get functional noise; unmerge first")
        lora_of[f"{name}.base_layer"] = layer
    if which not in NOISE_TARGETS:
        raise ValueError(f"unknown noise targets {which!r}; expected one of {NOISE_TARGETS}")
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
        if not is_linear(module):
            raise TypeError(f"{name}: noise on frozen weights supports nn.Linear and Conv1D layers, "
                            f"not {type(module).__name__}")
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(f"{name}: functional noise is for frozen layers, but it has trainable parameters")
        targets.append(FrozenTarget(name, module, lora_of.get(name)))
    return targets


class NoiseBuffers:
    """The memory a noisy pass works in, kept by the method across its passes:
    - scratch: one buffer per device and dtype, sized for the largest tensor seen, that every
      frozen layer forms its W0 + ε in, in turn, and trainable parameters draw their ε in (each use
      ends before the next one starts; on CUDA, by stream order);
    - saved copies of the perturbed trainable parameters, one per parameter name, until `clear`.
    Why persistent buffers: fresh layer-sized temporaries, freed between saved activations,
    fragment the CPU heap (glibc) and raise the peak resident memory."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._copies: dict[str, torch.Tensor] = {}
        self._eps: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def clear(self) -> None:
        """Drop the saved copies (a new task trains new parameters); the scratch stays."""
        self._copies = {}

    def reserve(self, weights: list[torch.Tensor]) -> None:
        for w in weights:
            key = (w.device, w.dtype)
            if key not in self._scratch or self._scratch[key].numel() < w.numel():
                self._scratch[key] = torch.empty(w.numel(), device=w.device, dtype=w.dtype)

    def scratch_like(self, weight: torch.Tensor) -> torch.Tensor:
        return self._scratch[(weight.device, weight.dtype)][:weight.numel()].view(weight.shape)

    def copies_of(self, named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Saved copies of the parameters (one multi-tensor copy; the buffers are allocated once)."""
        buffers = []
        for name, param in named:
            buffer = self._copies.get(name)
            if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype \
                    or buffer.device != param.device:
                buffer = self._copies[name] = torch.empty_like(param, memory_format=torch.contiguous_format)
            buffers.append(buffer)
        if buffers:
            torch._foreach_copy_(buffers, [param.detach() for _, param in named])
        return buffers

    def eps_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """One ε buffer per parameter, all views of one flat buffer per device and dtype (so the trainable
        parameters take their ε in one multi-tensor add)."""
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in params:
            sizes[(p.device, p.dtype)] = sizes.get((p.device, p.dtype), 0) + p.numel()
        for key, size in sizes.items():
            if key not in self._eps or self._eps[key].numel() < size:
                self._eps[key] = torch.empty(size, device=key[0], dtype=key[1])
        offsets, views = dict.fromkeys(sizes, 0), []
        for p in params:
            key = (p.device, p.dtype)
            views.append(self._eps[key][offsets[key]:offsets[key] + p.numel()].view(p.shape))
            offsets[key] += p.numel()
        return views


class FrozenNoise:
    """Regenerates W0 + ε for one layer and one pass from its key (into the pass's scratch buffer)."""

    def __init__(self, module: nn.Module, scale: Scale, key: int, buffers: NoiseBuffers):
        self.module, self.scale, self.key, self.buffers = module, scale, key, buffers

    def perturbed_weight(self) -> torch.Tensor:
        weight = linear_weight(self.module)
        return self.scale.add_to(weight, self.key, out=self.buffers.scratch_like(weight))


class _NoisyLinear(torch.autograd.Function):
    """y = x·(W0+ε)ᵀ + b with W0, b frozen; only the key is kept, ε is regenerated in backward
    (skipped when no gradient w.r.t. x is needed, e.g. the first layer's projections)."""

    @staticmethod
    def forward(ctx, x, bias, noise: FrozenNoise):
        ctx.noise, ctx.x_dtype = noise, x.dtype
        return F.linear(x, noise.perturbed_weight(), bias)  # under autocast (bf16 training) cast as any linear

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad.matmul(ctx.noise.perturbed_weight().to(grad.dtype)).to(ctx.x_dtype), None, None


@contextmanager
def replaced_forward(module: nn.Module, forward) -> Iterator[None]:
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


def keyed_noise(weight: torch.Tensor, scale: Scale, key: int) -> torch.Tensor:
    """ε for `weight` under `key` (public so tests and checks can rebuild a pass's noise)."""
    return scale.draw(weight.detach(), key)


@contextmanager
def perturbed(frozen: list[tuple[FrozenTarget, Scale]], trainable: list[tuple[str, nn.Parameter, Scale]],
              key: tuple, buffers: NoiseBuffers) -> Iterator[None]:
    """Within the block (run the noisy forward AND backward inside it): frozen targets compute with
    W0 + ε functionally, trainable parameters hold θ + ε in place. On exit the forwards are restored
    and the trainable parameters are copied back bit for bit. `key` = (seed, step, rank, micro-batch);
    each tensor's ε is keyed by `key` + its name."""
    params = [p for _, p, _ in trainable]
    saved = buffers.copies_of([(name, p) for name, p, _ in trainable])
    buffers.reserve([target.weight for target, _ in frozen])
    with ExitStack() as stack:
        try:
            with torch.no_grad():  # trainable only (LoRA); restored from `saved` on exit
                # each tensor's ε is its own keyed draw (one kernel each), then one multi-tensor add
                eps = [scale.draw(param.detach(), noise_key(*key, name), out=out)
                       for (name, param, scale), out in zip(trainable, buffers.eps_like(params))]
                if params:
                    torch._foreach_add_(params, eps)
            for target, scale in frozen:
                noise = FrozenNoise(target.module, scale, noise_key(*key, target.name), buffers)
                bias = target.module.bias

                def forward(x, *args, _noise=noise, _bias=bias, **kwargs):
                    return _NoisyLinear.apply(x, _bias, _noise)

                stack.enter_context(replaced_forward(target.module, forward))
            yield
        finally:
            if params:
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)


def noisy_mean_gradient(ctx, micro_batches: list, frozen: list, trainable: list, buffers: NoiseBuffers) -> torch.Tensor:
    """One noisy pass per micro-batch with fresh noise each (key: seed, update, rank, micro-batch):
    applies g = (1/N) Σ_i ∇L(θ+ε_i; B_i); returns the mean noisy loss (one-pass methods), a
    0-dim tensor on the device (the loop fetches it)."""
    n = len(micro_batches)
    losses = []
    for i, batch in enumerate(micro_batches):
        with perturbed(frozen, trainable, (ctx.seed, ctx.step, ctx.rank, i), buffers):
            losses.append(ctx.accumulate(batch, 1 / n, last=i == n - 1))
    return torch.stack(losses).float().mean()

"""One pass, two weights: the first rows of a batch compute with the clean weights, the rest with
the perturbed ones (RWP's `one_pass`), nothing written.

Within `split_perturbed(frozen, trainable, key, buffers, split, rows)`, every layer's input x is
batch-first ([rows, ...]); rows x[:split] (the clean half) compute with W0 and θ, rows x[split:]
(the noisy half) with W0 + ε and θ + ε:
- frozen targets: `_SplitNoisyLinear`, y = [x[:split]·W0ᵀ ; x[split:]·(W0+ε)ᵀ] + b. W0 + ε is
  materialised once per layer in the forward (the shared scratch buffer, as for `perturbed`) and
  once in backward (grad_x = [δ[:split]·W0 ; δ[split:]·(W0+ε)]): two matmuls whose FLOPs add up to
  one full-batch matmul. Only the key is kept.
- trainable linear weights θ (LoRA's A, B): `_SplitPerturbedLinear`, y = [x[:split]·θᵀ ;
  x[split:]·(θ+ε)ᵀ], ε a constant, so ∂L/∂θ = δᵀx over all rows collects ∇ at θ from the clean
  rows and ∇ at θ+ε from the noisy rows. ε (adapter-sized) is kept for the pass.
Both write the two products into one output (`_rows_mm`), so the split costs no concatenation.
ε is the same as `perturbed`'s for the same key (each tensor's: `key` + its name), so one pass over
a batch equals the serial clean pass over its first rows plus the serial noisy pass over the rest,
row by row. Examples never mix inside a causal LM (attention is per sequence), so a row's
activations depend only on its own weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from cl_flat.flatness.noise.functional import FrozenNoise, FrozenTarget, NoiseBuffers, replaced_forward
from cl_flat.flatness.noise.scales import Scale
from cl_flat.lora_layers import linear_weight
from cl_flat.seeding import noise_key


def _check_rows(x: torch.Tensor, rows: int, name: str) -> None:
    if x.shape[0] != rows:
        raise RuntimeError(f"rwp one_pass: layer {name} got an input of shape {tuple(x.shape)}, whose first dim is not "
                           f"the micro-batch's {rows} examples; this model reshapes the batch dimension, so its rows "
                           "cannot be split into a clean and a noisy half (set one_pass: false)")


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer on `x` computes in: autocast's where autocast is on (bf16 training,
    `cl_flat.precision`), else x's. A custom Function's forward runs under autocast, but `torch.mm(out=)`
    does not cast: its operands are cast here, as autocast would cast F.linear's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _rows_mm(x: torch.Tensor, split: int, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[x[:split]·first ; x[split:]·second] (over x's last dim), both products written into one
    output: no concatenation, and no zero-filled slice gradients as autograd's slicing would add.
    All three operands in one dtype (the activation dtype, `activation_dtype`)."""
    flat = x.reshape(-1, x.shape[-1])
    cut = split * (flat.shape[0] // x.shape[0])  # rows of `flat` per example times the clean examples
    out = flat.new_empty(flat.shape[0], first.shape[1])
    torch.mm(flat[:cut], first, out=out[:cut])
    torch.mm(flat[cut:], second, out=out[cut:])
    return out.view(*x.shape[:-1], first.shape[1])


class _SplitNoisyLinear(torch.autograd.Function):
    """y = [x[:s]·W0ᵀ ; x[s:]·(W0+ε)ᵀ] + b with W0, b frozen; ε regenerated in backward."""

    @staticmethod
    def forward(ctx, x, bias, noise: FrozenNoise, split: int):
        ctx.noise, ctx.split, ctx.x_dtype = noise, split, x.dtype
        dtype = activation_dtype(x)
        y = _rows_mm(x.to(dtype), split, linear_weight(noise.module).t().to(dtype),
                     noise.perturbed_weight().t().to(dtype))
        return y if bias is None else y.add_(bias.to(dtype))  # y is this call's fresh output, never a weight

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        noise = ctx.noise
        grad_x = _rows_mm(grad, ctx.split, linear_weight(noise.module).to(grad.dtype),
                          noise.perturbed_weight().to(grad.dtype))
        return grad_x.to(ctx.x_dtype), None, None, None


class _SplitPerturbedLinear(torch.autograd.Function):
    """y = [x[:s]·θᵀ ; x[s:]·(θ+ε)ᵀ] + b with θ (and b) trainable, ε a constant: ∂L/∂θ = δᵀx over
    all rows (∂(θ+ε)/∂θ = I), so the clean rows give ∇ at θ and the noisy rows ∇ at θ+ε."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, split: int):
        dtype = activation_dtype(x)  # θ + ε in θ's dtype (as θ perturbed in place), then cast as autocast would
        x_c, weight_c, noisy_c = x.to(dtype), weight.to(dtype), (weight + eps).to(dtype)
        ctx.save_for_backward(x_c, weight_c, noisy_c)
        ctx.split, ctx.dtypes = split, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        y = _rows_mm(x_c, split, weight_c.t(), noisy_c.t())
        return y if bias is None else y.add_(bias.to(dtype))  # y is this call's fresh output, never a weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, noisy = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = _rows_mm(grad, ctx.split, weight, noisy).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = flat.t().mm(x.reshape(-1, x.shape[-1])).to(w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = flat.sum(0).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


@contextmanager
def split_perturbed(frozen: list[tuple[FrozenTarget, Scale]], trainable: list[tuple[str, nn.Linear, Scale]],
                    key: tuple, buffers: NoiseBuffers, split: int, rows: int) -> Iterator[None]:
    """Within the block (run the forward AND backward inside it), rows [split:] of the batch compute
    with W0 + ε and θ + ε, rows [:split] with W0 and θ (see the module docstring). `trainable`:
    (parameter name, the nn.Linear whose weight it is, scale). `key` = (seed, step, rank, micro-batch)
    as for `perturbed`; each tensor's ε is keyed by `key` + its name."""
    buffers.reserve([target.weight for target, _ in frozen])
    with ExitStack() as stack:
        for name, module, scale in trainable:
            eps = scale.draw(module.weight.detach(), noise_key(*key, name))

            def forward(x, *args, _m=module, _eps=eps, _name=name, **kwargs):
                _check_rows(x, rows, _name)
                return _SplitPerturbedLinear.apply(x, _m.weight, _m.bias, _eps, split)

            stack.enter_context(replaced_forward(module, forward))
        for target, scale in frozen:
            noise = FrozenNoise(target.module, scale, noise_key(*key, target.name), buffers)

            def frozen_forward(x, *args, _noise=noise, _bias=target.module.bias, _name=target.name, **kwargs):
                _check_rows(x, rows, _name)
                return _SplitNoisyLinear.apply(x, _bias, _noise, split)

            stack.enter_context(replaced_forward(target.module, frozen_forward))
        yield


def split_rows(batch) -> tuple[int, dict, dict]:
    """(split, clean half, noisy half) of a micro-batch of m examples: its first ⌊m/2⌋ examples
    and the other ⌈m/2⌉ (every tensor cut along dim 0)."""
    if not isinstance(batch, dict):
        raise TypeError("rwp one_pass: a micro-batch must be a dict of tensors (cut by example along dim 0)")
    rows = next(iter(batch.values())).shape[0]
    split = rows // 2
    return split, {k: v[:split] for k, v in batch.items()}, {k: v[split:] for k, v in batch.items()}

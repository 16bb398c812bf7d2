"""The precision path of training: which dtype each tensor has, which optimizer steps them, how the gradient is
clipped. One home for what `deepspeed.bf16` means, chosen so an update has no per-tensor Python loop with device
work and no host sync of its own (see docs/internals.md, "Performance").

- `deepspeed.bf16: true`: the frozen weights (the base, earlier adapters) are bf16 (`models.load_run_model` casts
  them before anything runs); the trainable adapter stays fp32 (peft creates it so) and is itself the master
  copy; every forward runs under `torch.autocast(bfloat16)` (`Compute`). DeepSpeed's own bf16 mode stays off:
  under ZeRO-0 it wraps the optimizer in `FP16_UnfusedOptimizer`, whose step loops over the tensors in Python
  with one host sync per tensor (its overflow check). peft's cast of every LoRA input to the adapter's dtype is
  switched off under autocast (autocast decides the matmul dtype; the cast would only add two copies per layer).
- the optimizer is torch AdamW, `fused=True` on CUDA (one kernel for all tensors) and `foreach=True` elsewhere
  (a handful of multi-tensor ops), never the per-tensor path.
- under ZeRO-0 the loop clips itself (`clip_`): from the gradient norm it computes anyway for the non-finite
  check, one multi-tensor multiply, no host sync (DeepSpeed's fp32 clipping loops over the tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cl_flat.lora_layers import lora_layers


def compute_dtype(bf16: bool) -> torch.dtype | None:
    """The autocast dtype of the forward passes (None: no autocast, every tensor computes in its own dtype)."""
    return torch.bfloat16 if bf16 else None


def trainable_in_fp32(params: list[torch.nn.Parameter]) -> None:
    """Keep the trainable adapter in fp32 (it is its own master copy); a no-op where it is already."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device):
    """torch AdamW: fused on CUDA, multi-tensor (foreach) elsewhere; never a Python loop over the tensors."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None, foreach=None if fused else True)


def wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or in its own dtype where that is wider (fp64 tests stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def global_norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """‖x‖ = ‖(‖x_1‖, …, ‖x_P‖)‖ over every tensor of `xs` at once: one fused per-tensor norm, in fp32, on the
    device (no host sync). The gradient norm of clipping and of the non-finite check, and SAM's ‖g‖."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)).float())


def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float | None) -> None:
    """g ← g · min(1, max_norm / (‖g‖ + 1e-6)) (torch's and DeepSpeed's clipping formula) with `norm` = ‖g‖ given,
    as one multi-tensor multiply by a device scalar: no host sync, no per-tensor loop."""
    if max_norm and grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


class Compute:
    """The forward passes' precision: `with compute():` runs them under autocast(dtype) with peft's input cast
    switched off on `module`'s LoRA layers (restored on exit: evaluation without autocast needs it);
    without a dtype, nothing changes."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None):
        self.dtype = dtype
        self.layers = [layer for _, layer in lora_layers(module)] if dtype is not None else []
        self.device_type = next(module.parameters()).device.type

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        before = [getattr(layer, "cast_input_dtype_enabled", True) for layer in self.layers]
        for layer in self.layers:
            layer.cast_input_dtype_enabled = False
        try:
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield
        finally:
            for layer, value in zip(self.layers, before):
                layer.cast_input_dtype_enabled = value

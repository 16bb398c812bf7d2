"""No probe gradient lives into a later forward. Why (flatness/base.py): on CPU, the small tensors a backward
allocates among the activations it frees, kept through the next forward, pin that memory, and the peak resident
memory grows by up to a pass's activations (GSAM and LookSAM once held the clean gradient so: results/README.md).
Every method of the package, with its defaults, over windows of 1 and 2 micro-batches: when a forward
starts, every gradient an earlier probe returned is gone, or copied into buffers the method allocated for the task
(`KeptGradients`)."""

from __future__ import annotations

import weakref

import pytest
import torch

from cl_flat.flatness import build_method
from cl_flat.flatness.reference import TorchContext
from cl_flat.registry import METHODS
from helpers import lm_loss, tiny_peft_model

PACKAGE_METHODS = [name for name in METHODS.names() if METHODS.get(name).cls.__module__.startswith("cl_flat.")]


class WatchingContext(TorchContext):
    """Counts, at the start of every forward, the probe gradients still referenced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned: list[weakref.ref] = []
        self.alive_at_forward: list[int] = []

    def loss(self, batch):
        self.alive_at_forward.append(sum(ref() is not None for ref in self.returned))
        return super().loss(batch)

    def grads(self, loss):
        grads = super().grads(loss)
        self.returned += [weakref.ref(g) for g in grads]
        return grads


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("name", PACKAGE_METHODS)
def test_no_probe_gradient_lives_into_a_later_forward(name, micro_batches):
    model = tiny_peft_model()
    method = build_method({"method": name})
    method.begin_task(model)
    generator = torch.Generator().manual_seed(2)
    forwards, probes = 0, 0
    for step in range(2):  # LookSAM: its SAM update, then one reusing the stored direction
        batches = [torch.randint(3, 250, (2, 10), generator=generator) for _ in range(micro_batches)]
        ctx = WatchingContext(model, lm_loss, step=step, total_steps=2, seed=0)
        method.window(ctx, batches)
        for p in ctx.params.values():
            p.grad = None
        assert ctx.alive_at_forward == [0] * len(ctx.alive_at_forward), (step, ctx.alive_at_forward)
        forwards, probes = forwards + len(ctx.alive_at_forward), probes + len(ctx.returned)
    assert forwards >= 2
    if name in ("sam", "gsam", "looksam", "cflat"):  # the test watches something: these pass by probes
        assert probes > 0

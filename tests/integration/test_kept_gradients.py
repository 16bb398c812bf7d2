"""ZeRO-0 engines on a CPU keep their gradient buffers: after `engine.step()` every trainable
parameter's `.grad` is the same tensor as before the first update, zeroed in place (DeepSpeed's own
zero_grad would drop it, and each update's backward would allocate it again among the activations).
On a GPU autograd writes fresh gradients instead (`train.create_engine`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, quiet_env

pytestmark = pytest.mark.integration

SCRIPT = """
import torch
from cl_flat import dist as ds
from cl_flat.data.plan import BatchShape, TaskPlan
from cl_flat.train import create_engine
from cl_flat.adapters import AdapterStack
from cl_flat.config import load_config
from cl_flat.loss import target_loss
from cl_flat.models import load_model

ds.init_distributed()
config = load_config("configs/bench_cpu.yaml", ['model.name_or_path="tiny-random:llama"'])
model, _ = load_model(config.model.name_or_path, config.model.dtype, 0)
stack = AdapterStack(model, config.lora, 0)
stack.add_task(0, "t")
params = [p for p in stack.model.parameters() if p.requires_grad]
t = config.training
plan = TaskPlan(BatchShape.of(t, 1), 4, 4)
engine = create_engine(t, config.deepspeed, stack.model, params, plan)
buffers = [p.grad for p in params]
ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
for update in range(2):
    for last in (False, True):  # two micro-batches per update
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(target_loss(engine.module, batch), scale_wrt_gas=False)
    assert any(bool(g.any()) for g in buffers), "backward did not reach the kept buffers"
    engine.step()
    assert all(p.grad is b for p, b in zip(params, buffers)), "a .grad buffer was replaced"
    assert not any(bool(b.any()) for b in buffers), "the buffers were not zeroed"
ds.shutdown()
print("KEPT", len(buffers))
"""


def test_fp32_zero0_engine_keeps_and_zeroes_gradient_buffers():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=quiet_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KEPT" in proc.stdout

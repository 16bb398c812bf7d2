"""O-LoRA (lora.strategy: olora) in the real loop: the orthogonality of the new adapter to the old one
shrinks over a tiny run (a DeepSpeed engine in this process)."""

from __future__ import annotations

import pytest
import torch

from helpers import olora_stack

pytestmark = pytest.mark.integration


def test_orthogonality_shrinks_over_a_tiny_run():
    from cl_flat import dist
    from cl_flat.config import validate_config
    from cl_flat.data.batches import Encoded
    from cl_flat.data.plan import TrainTask
    from cl_flat.flatness import build_method
    from cl_flat.train import train_task

    dist.init_distributed()
    stack, _, penalty = olora_stack(lambda_orth=0.5)
    config = validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": [{"name": "x", "source":
                              "builtin"}], "training": {"micro_batch_size": 2, "max_steps": 8, "learning_rate": 0.01},
                              "logging": {"progress": False}})
    gen = torch.Generator().manual_seed(2)
    examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=gen).tolist()),
                        tuple([-100] * 5 + ids[5:])) for _ in range(16)]
    logs = []
    train_task(TrainTask(1, "two", examples, 256), stack.model, build_method({"method": "sam"}), config.training,
               config.deepspeed, 0, logs.append, regulariser=penalty)
    orth = [r["olora_orth"] for r in logs]
    assert len(orth) == 8 and orth[-1] < 0.8 * orth[0], orth

"""DeepSpeed: process-group set-up, the config dict built from RunConfig, engine creation,
and small rank helpers.

One process without a launcher gets the environment DeepSpeed needs (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; otherwise it tries MPI discovery). Under `deepspeed`
or `torchrun` these come from the launcher. CPU runs use gloo, CUDA runs nccl.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from typing import Any

import torch

from cl_flat.config import RunConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Start (once) the process group DeepSpeed uses; a lone process becomes rank 0 of 1."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def shutdown() -> None:
    """Leave the process group cleanly (an abrupt exit of a gloo group occasionally aborts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_gather_objects(value: Any) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_mean(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def broadcast_object(value: Any) -> Any:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def deepspeed_config(config: RunConfig, world: int) -> dict[str, Any]:
    training, section = config.training, config.deepspeed
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world,
        "gradient_clipping": training.max_grad_norm or 0.0,
        "zero_optimization": {"stage": section.zero_stage},
        "bf16": {"enabled": section.bf16},
        # our AdamW is a torch optimizer: allowed under ZeRO, never JIT-compiled
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds.update(section.extra)
    return ds


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at update `step` (0-based): linear warm-up to 1 over `warmup`
    updates, then constant, linear decay to 0, or half-cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def create_engine(config: RunConfig, model: torch.nn.Module, params: list[torch.nn.Parameter], total_updates: int):
    """A DeepSpeed engine training `params` with torch AdamW and the configured schedule."""
    import deepspeed

    training = config.training
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    # fp32 ZeRO-0 (DeepSpeed steps this optimizer on these parameters): gradient buffers allocated
    # once, before any activation, and zeroed in place after each step. Why: a `.grad` allocated
    # afresh by each update's first backward lands among the just-freed activations; living on
    # into the next forward, hundreds of such small buffers fragment the CPU heap (glibc), and a
    # second pass in the same update (SAM, RWP, gradient accumulation) grew the peak resident
    # memory by 10-15%. DeepSpeed's own zero_grad on this path sets every .grad to None.
    keep_grads = config.deepspeed.zero_stage == 0 and not config.deepspeed.bf16
    if keep_grads:
        for p in params:
            p.grad = torch.zeros_like(p)
    warmup = math.ceil(training.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(training.lr_scheduler, warmup, total_updates))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=deepspeed_config(config, world_size()))
    if keep_grads:
        engine.zero_grad = functools.partial(optimizer.zero_grad, set_to_none=False)
    if world_size() == 1 and config.deepspeed.zero_stage == 0:
        # nothing to reduce: skip the flatten/all-reduce/copy-back of every gradient
        # (ZeRO-1/2 keep theirs: their optimizers do bookkeeping in the reduction)
        engine.enable_backward_allreduce = False
    return engine

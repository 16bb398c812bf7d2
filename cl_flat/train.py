"""train_task(): the single explicit update loop of the tool.

One update = one flatness-method window over N = gradient_accumulation_steps micro-batches
on every rank, then exactly one `engine.step()` (DeepSpeed reduces, clips, steps the
optimizer and the lr schedule). The loop does not know which method runs.

Data order: each epoch is a permutation drawn from a generator keyed by (seed, task index,
epoch); update u takes the u-th global batch of micro_batch_size × N × world examples and
rank r takes its r-th contiguous share. Incomplete global batches are dropped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cl_flat import engine as ds
from cl_flat.config import RunConfig, UserError
from cl_flat.data.batches import Encoded, collate
from cl_flat.flatness.base import FlatnessMethod, StepContext
from cl_flat.loss import causal_lm_loss


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EngineContext(StepContext):
    """StepContext over a DeepSpeed engine: probes through `engine.module`, backward through
    `engine.backward` with the accumulation boundary set explicitly (one step per window)."""

    def __init__(self, engine, loss_fn: Callable, params: dict[str, torch.nn.Parameter], **kwargs: Any):
        super().__init__(params, **kwargs)
        self.engine = engine
        self.loss_fn = loss_fn

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def loss(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.engine.module, batch)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)


@dataclass(frozen=True)
class TaskPlan:
    updates: int
    updates_per_epoch: int
    global_batch: int


def plan_task(config: RunConfig, n_examples: int, world: int, task_name: str) -> TaskPlan:
    t = config.training
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise UserError(f"tasks[{task_name}]: {n_examples} training examples are fewer than one global batch "
                        f"({t.micro_batch_size} × {t.gradient_accumulation_steps} accumulation × {world} ranks)")
    return TaskPlan(t.max_steps or t.epochs * per_epoch, per_epoch, global_batch)


def window_batches(examples: list[Encoded], plan: TaskPlan, update: int, config: RunConfig, task_index: int,
                   rank: int, pad_id: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    epoch, position = divmod(update, plan.updates_per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(config.run.seed, "data", task_index, epoch))
    order = torch.randperm(len(examples), generator=generator)
    mbs, n = config.training.micro_batch_size, config.training.gradient_accumulation_steps
    start = position * plan.global_batch + rank * mbs * n
    mine = order[start:start + mbs * n].tolist()
    return [{k: v.to(device) for k, v in collate([examples[i] for i in mine[j * mbs:(j + 1) * mbs]], pad_id).items()}
            for j in range(n)]


def _grad_norm(params: dict[str, torch.nn.Parameter]) -> float | None:
    """‖g‖ of the (already reduced) gradient before clipping; DeepSpeed reports it only for
    ZeRO and mixed precision, so plain fp32 ZeRO-0 computes it here."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None


def train_task(config: RunConfig, model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
               method: FlatnessMethod, examples: list[Encoded], pad_id: int, task_index: int, task_name: str,
               log: Callable[[dict[str, Any]], None], progress=None) -> dict[str, float]:
    """Train `params` (the current adapter) on one task; returns summary stats."""
    world, rank = ds.world_size(), ds.rank()
    plan = plan_task(config, len(examples), world, task_name)
    engine = ds.create_engine(config, model, list(params.values()), plan.updates)
    device = engine.device
    method_seed = derive_seed(config.run.seed, "method", task_index)
    bar = progress.add_task(task_name, total=plan.updates) if progress is not None else None
    started = time.perf_counter()
    losses: list[float] = []
    engine.train()
    for update in range(plan.updates):
        batches = window_batches(examples, plan, update, config, task_index, rank, pad_id, device)
        ctx = EngineContext(engine, causal_lm_loss, params, step=update, total_steps=plan.updates,
                            seed=method_seed, rank=rank, world_size=world)
        lr = engine.get_lr()[0]
        stats = method.window(ctx, batches)
        plain_norm = _grad_norm(params) if config.deepspeed.zero_stage == 0 else None
        engine.step()
        loss = ds.all_reduce_mean(stats.pop("loss"))
        losses.append(loss)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = plain_norm if grad_norm is None else grad_norm
        elapsed = time.perf_counter() - started
        log({"task": task_name, "task_index": task_index, "step": update + 1, "loss": loss, "lr": lr,
             "grad_norm": None if grad_norm is None else float(grad_norm),
             "seconds": elapsed, **{k: float(v) for k, v in stats.items()}})
        if bar is not None:
            progress.update(bar, advance=1, loss=loss, rate=(update + 1) / max(elapsed, 1e-9))
    engine.destroy()
    for p in params.values():  # the adapter is frozen next: free its gradient buffers
        p.grad = None
    return {"updates": plan.updates, "final_loss": losses[-1], "seconds": time.perf_counter() - started}

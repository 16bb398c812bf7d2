"""train_task(): the single explicit update loop of the tool, and the DeepSpeed engine it drives.

One update = one flatness-method window over N = gradient_accumulation_steps micro-batches
on every rank, then exactly one `engine.step()` (DeepSpeed reduces, clips, steps the
optimizer and the lr schedule). The loop does not know which method runs; it calls the
method's `begin_task` once per task and `window` once per update; which examples an update takes is
`cl_flat.data.plan`'s.
"""

from __future__ import annotations

import copy
import functools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from cl_flat import dist, stopping
from cl_flat.checkpoint import TaskCheckpoints
from cl_flat.config import DeepSpeedSection, TrainingSection
from cl_flat.data.plan import TaskPlan, TrainTask, window_batches
from cl_flat.errors import NonFiniteUpdate
from cl_flat.flatness.base import FlatnessMethod, StepContext
from cl_flat.loss import target_loss, target_split_losses
from cl_flat.precision import Compute, adamw, clip_, compute_dtype, global_norm, trainable_in_fp32
from cl_flat.schedules import lr_factor
from cl_flat.seeding import derive_seed, seed_dropout
from cl_flat.strategies.base import LossTerms


class EngineContext(StepContext):
    """StepContext over a DeepSpeed engine: probes through `engine.module`, backward through
    `engine.backward` with the accumulation boundary set explicitly (one step per window). Every
    forward runs in `compute` (the precision path: autocast under bf16, `cl_flat.precision`)."""

    def __init__(self, engine, loss_fn: Callable, params: dict[str, torch.nn.Parameter], *,
                 compute: Compute | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.engine = engine
        self.loss_fn = loss_fn
        self.compute = compute if compute is not None else Compute(engine.module, None)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def loss(self, batch: Any) -> torch.Tensor:
        with self.compute():
            return self.loss_fn(self.engine.module, batch)

    def split_losses(self, batch: Any, split: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self.compute():
            return super().split_losses(batch, split)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def mean_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.world_size == 1 or not tensors:
            return tensors
        flat = dist.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors])).div_(self.world_size)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def deepspeed_config(training: TrainingSection, section: DeepSpeedSection, plan: TaskPlan) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.batch.micro_batch_size,
        "gradient_accumulation_steps": plan.batch.accumulation,
        "train_batch_size": plan.batch.global_batch,
        # ZeRO-0: the loop clips (`precision.clip_`); DeepSpeed's fp32 clipping loops over the tensors
        "gradient_clipping": 0.0 if checked_before_step(section) else training.max_grad_norm or 0.0,
        "zero_optimization": {"stage": section.zero_stage},
        # bf16 is autocast over fp32 adapters (`cl_flat.precision`), never DeepSpeed's bf16 optimizer wrappers
        "bf16": {"enabled": False},
        # our AdamW is a torch optimizer: allowed under ZeRO, never JIT-compiled
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds.update(section.extra)
    return ds


def create_engine(training: TrainingSection, section: DeepSpeedSection, model: torch.nn.Module,
                  params: list[torch.nn.Parameter], plan: TaskPlan):
    """A DeepSpeed engine training `params` (kept in fp32) with torch AdamW (`precision.adamw`) and the
    configured schedule."""
    import deepspeed

    trainable_in_fp32(params)
    optimizer = adamw(params, training.learning_rate, training.weight_decay, dist.device())
    # ZeRO-0 on a CPU (DeepSpeed steps this optimizer on these parameters): gradient buffers allocated
    # once, before any activation, and zeroed in place after each step. Why: a `.grad` allocated
    # afresh by each update's first backward lands among the just-freed activations; living on
    # into the next forward, hundreds of such small buffers fragment the CPU heap (glibc), and a
    # second pass in the same update (SAM, RWP, gradient accumulation) raised the peak resident
    # memory. On a GPU the caching allocator has no such problem, and kept buffers would cost one
    # accumulating add per tensor per backward: there autograd writes fresh gradients (DeepSpeed's
    # zero_grad sets every .grad to None).
    keep_grads = checked_before_step(section) and dist.device().type == "cpu"
    if keep_grads:
        for p in params:
            p.grad = torch.zeros_like(p)
    warmup = math.ceil(training.warmup_ratio * plan.updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(training.lr_scheduler, warmup, plan.updates))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=deepspeed_config(training, section, plan))
    if keep_grads:
        engine.zero_grad = functools.partial(optimizer.zero_grad, set_to_none=False)
    if plan.batch.world == 1 and section.zero_stage == 0:
        # nothing to reduce: skip the flatten/all-reduce/copy-back of every gradient
        # (ZeRO-1/2 keep theirs: their optimizers do bookkeeping in the reduction)
        engine.enable_backward_allreduce = False
    return engine


def _grads(params: dict[str, torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params.values() if p.grad is not None]


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """‖g‖ of the (already reduced) gradient before clipping, as a device tensor (no host sync); DeepSpeed
    reports it only under ZeRO-1/2, so ZeRO-0 computes it here (and clips with it)."""
    return global_norm(grads) if grads else None


def _fetch(values: dict[str, Any], grad_norm: torch.Tensor | None, device: torch.device,
           unchecked: dict[str, Any] | None = None) -> tuple[dict[str, float | None], list[str]]:
    """The update's one device→host transfer: (host values, the names that are non-finite).

    `values` (the method's stats: 0-dim tensors still on the device, or host floats) and the
    gradient norm are checked for non-finite values on the device; with several ranks the flags are
    summed over the ranks in the same collective as the loss (every rank takes the same decision, and
    `loss` comes back as the mean over ranks); then one `.tolist()` brings everything to the host.
    `unchecked` (e.g. O-LoRA's terms) comes in the same transfer but is not checked."""
    checked = {**values, **({} if grad_norm is None else {"grad_norm": grad_norm})}
    unchecked = {k: v for k, v in (unchecked or {}).items() if k not in checked}
    host = {k: None if v is None else float(v) for k, v in {**checked, **unchecked}.items() if not torch.is_tensor(v)}
    world = dist.world_size()
    if world == 1:  # host floats stay on the host
        on_device = {k: v for k, v in {**checked, **unchecked}.items() if torch.is_tensor(v)}
        n_checked = sum(1 for k in on_device if k in checked)
    else:  # everything into one vector (host floats by one small asynchronous copy)
        host = {k: v for k, v in host.items() if v is None}
        on_device = {k: v if torch.is_tensor(v) else torch.tensor(float(v)).to(device, non_blocking=True)
                     for k, v in {**checked, **unchecked}.items() if v is not None}
        n_checked = sum(1 for k in on_device if k in checked)
    names = list(on_device)  # checked ones first (dict order)
    local = (torch.stack([v.detach().reshape(()).to(device, torch.float32) for v in on_device.values()])
             if names else torch.zeros(0, device=device))
    shared = (~torch.isfinite(local[:n_checked])).float()
    stop = float(stopping.requested() != 0)
    if world > 1:  # the stop request rides along (last): every rank stops after the same update
        shared = dist.all_reduce_sum(torch.cat([shared, local[names.index("loss")].reshape(1)
                                                if "loss" in on_device else local.new_zeros(0),
                                                torch.tensor([stop]).to(device, non_blocking=True)]))
    fetched = torch.cat([local, shared]).tolist()  # the one host sync of the update
    stopping.agree((fetched.pop() if world > 1 else stop) > 0)
    got = dict(zip(names, fetched))
    flagged = {k for k, flag in zip(names[:n_checked], fetched[len(names):]) if flag > 0}
    flagged |= {k for k, v in host.items() if k in checked and v is not None and not math.isfinite(v)}
    bad = [k for k in checked if k in flagged]  # in the method's order, the gradient norm last
    if world > 1 and "loss" in on_device:
        got["loss"] = fetched[-1] / world
    return {**host, **got}, bad


def _step(engine, params, values: dict[str, Any], rule: StepRule,
          unchecked: dict[str, Any] | None = None) -> tuple[list[str], dict[str, float | None]]:
    """engine.step() unless the update is non-finite; (what was non-finite, the host values: the
    method's stats with `loss` averaged over ranks, `grad_norm`, and `unchecked`). One host sync.

    ZeRO-0 (a torch optimizer stepped as is) is checked here before the step, on the losses of every
    pass and the gradient norm, and then not stepped; the gradient is clipped here too, from that norm
    (one multi-tensor multiply, `precision.clip_`), before the check so the device keeps busy: a
    dropped update zeroes it anyway. DeepSpeed's ZeRO-1/2 optimizers check the gradient themselves and
    drop a non-finite step (no optimizer or scheduler step): they are stepped first and everything is
    fetched after, with the norm DeepSpeed reports; the loop reads a dropped step back through
    `was_step_applied` (there, a non-finite loss with a finite gradient would be reported although
    DeepSpeed stepped)."""
    if rule.checked_first:
        grads = _grads(params)
        norm = _grad_norm(grads)
        if norm is not None:
            clip_(grads, norm, rule.max_grad_norm)
        host, bad = _fetch(values, norm, engine.device, unchecked)
        if bad:
            engine.zero_grad()
        else:
            engine.step()
        return bad, host
    engine.step()
    norm = engine.get_global_grad_norm()
    host, bad = _fetch(values, norm if torch.is_tensor(norm) else None, engine.device, unchecked)
    if not torch.is_tensor(norm):
        host["grad_norm"] = None if norm is None else float(norm)
        if norm is not None and not math.isfinite(host["grad_norm"]):
            bad.append("grad_norm")
    if not engine.was_step_applied() and "grad_norm" not in bad:
        bad.append("grad_norm")
    return bad, host


def checked_before_step(section: DeepSpeedSection) -> bool:
    """Whether the engine steps a torch optimizer as is (ZeRO-0, fp32 or bf16: `cl_flat.precision`), checked
    and clipped by `_step` before stepping."""
    return section.zero_stage == 0


@dataclass(frozen=True)
class StepRule:
    """How `_step` ends an update: `checked_first` (ZeRO-0: the loop checks, clips to `max_grad_norm` and steps
    a torch optimizer) or not (ZeRO-1/2: DeepSpeed clips, checks and drops a non-finite step itself)."""

    checked_first: bool
    max_grad_norm: float | None

    @classmethod
    def of(cls, training: TrainingSection, section: DeepSpeedSection) -> StepRule:
        return cls(checked_before_step(section), training.max_grad_norm)


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a method's state: its float and integer tensors copied by one multi-tensor op (x·1, exact),
    everything else deep-copied (copy.deepcopy would clone the tensors one by one)."""
    leaves, spec = pytree.tree_flatten(state)
    fast = [i for i, v in enumerate(leaves) if torch.is_tensor(v) and v.dtype not in (torch.bool, torch.complex64,
                                                                                        torch.complex128)]
    copies = dict(zip(fast, torch._foreach_mul([leaves[i].detach() for i in fast], 1))) if fast else {}
    return pytree.tree_unflatten([copies[i] if i in copies else copy.deepcopy(v) for i, v in enumerate(leaves)], spec)


def one_update(engine, method: FlatnessMethod, ctx: EngineContext, batches: list[dict[str, torch.Tensor]],
               rule: StepRule, unchecked: dict[str, Any] | None = None) -> tuple[list[str], dict[str, float | None]]:
    """One update as training runs it (`train_task`'s loop, and `cl-flat bench`): the method's window over
    the micro-batches, then `_step` (engine.step() unless non-finite, one host sync); a dropped update
    leaves the method's state as it was. `rule`: `StepRule.of` the task's settings. Returns (what was
    non-finite, the host values: the method's stats with `loss`, `grad_norm`, and `unchecked`)."""
    before = _snapshot(method.state_dict())  # a dropped update must not change the method either (copies:
    # a method may update its state in place)
    bad, host = _step(engine, ctx.params, method.window(ctx, batches), rule, unchecked)
    if bad:
        method.load_state_dict(before)
    return bad, host


def _stop_if_needed(training: TrainingSection, method: str, record: dict[str, Any], bad: list[str], skipped: int,
                    updates: int) -> None:
    """After a dropped non-finite update (`record`): stop the run (`on_nonfinite: stop`), or once more than
    `max_skipped_fraction` of the task's updates were skipped."""
    what = ", ".join(f"{k} = {record.get(k)}" for k in bad)
    where = f"task {record['task']!r} (index {record['task_index']}), update {record['step']} of {updates}"
    if training.on_nonfinite == "stop":
        raise NonFiniteUpdate(f"{where}: non-finite {what} in the {method} update; the step was not "
                              "applied. Completed tasks' results are intact: change the config (e.g. "
                              "training.learning_rate, the method's noise or radius, or "
                              "training.on_nonfinite: skip) and continue with --resume --allow-config-change")
    if skipped > training.max_skipped_fraction * updates:
        raise NonFiniteUpdate(f"{where}: {skipped} skipped non-finite updates exceed "
                              f"training.max_skipped_fraction = {training.max_skipped_fraction} of "
                              f"{updates}; last: {what}")


def _checkpoint_or_stop(engine, method: FlatnessMethod, checkpoints: TaskCheckpoints | None, task: str, done: int,
                        total: int, skipped: int) -> None:
    """After update `done`: the periodic checkpoint when due; on an agreed stop request, a checkpoint at
    this update (even after the last: resume then only saves the adapter) and `stopping.Stopped`."""
    stop = stopping.agreed()
    if checkpoints is not None and (checkpoints.due(done, total) or stop):
        checkpoints.save(engine, method, done, skipped)
    if stop:
        engine.destroy()
        raise stopping.Stopped(stopping.requested() or signal.SIGTERM, task, done, total, checkpoints is not None)


def _loss_functions(regulariser: LossTerms | None) -> tuple[Callable, Callable | None]:
    """(the loss of a batch, the losses of its two halves from one forward for RWP one_pass): with a
    regulariser (O-LoRA's terms) added to the loss; its terms depend on θ alone and would enter both halves
    at θ, so with one there is no split loss and one_pass runs its serial form."""
    if regulariser is None:
        return target_loss, target_split_losses
    return (lambda m, b: target_loss(m, b) + regulariser(m)), None


def train_task(task: TrainTask, model: torch.nn.Module, method: FlatnessMethod, training: TrainingSection,
               section: DeepSpeedSection, seed: int, log: Callable[[dict[str, Any]], None],
               progress=None, checkpoints: TaskCheckpoints | None = None,
               regulariser: LossTerms | None = None) -> dict[str, float]:
    """Train the trainable parameters of `model` (the current adapter) on one task under DeepSpeed;
    `seed` is the run seed. `regulariser(module)` (O-LoRA's terms) is added to the loss of every
    pass; its `stats()` are logged per update. With `checkpoints`, continue from the newest in-task checkpoint and
    write one every `checkpoints.every` updates. A non-finite update stops the run
    (`on_nonfinite: stop`, NonFiniteUpdate) or is dropped and counted (`skip`).
    Returns summary stats."""
    world, rank = dist.world_size(), dist.rank()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plan = TaskPlan.for_task(training, len(task.examples), world, task.name)
    engine = create_engine(training, section, model, list(params.values()), plan)
    device = engine.device
    method.begin_task(engine.module)
    start, skipped = checkpoints.load(engine, method) if checkpoints is not None else (0, 0)
    method_seed = derive_seed(seed, "method", task.index)
    rule = StepRule.of(training, section)
    compute = Compute(engine.module, compute_dtype(section.bf16))
    loss_fn, split_loss_fn = _loss_functions(regulariser)
    bar = progress.add_task(task.name, total=plan.updates) if progress is not None else None
    if bar is not None:
        progress.update(bar, completed=start)  # a resumed task's updates done before
    started = time.perf_counter()
    losses: list[float] = []
    engine.train()
    for update in range(start, plan.updates):
        seed_dropout(seed, task.index, update)
        batches = window_batches(task, plan, update, seed, rank, device)
        ctx = EngineContext(engine, loss_fn, params, step=update, total_steps=plan.updates,
                            seed=method_seed, rank=rank, world_size=world, split_loss_fn=split_loss_fn,
                            compute=compute)
        terms = regulariser.stats() if regulariser is not None else {}
        lr = engine.get_lr()[0]
        bad, host = one_update(engine, method, ctx, batches, rule, terms)
        loss, grad_norm = host.pop("loss"), host.pop("grad_norm", None)
        stats = {k: v for k, v in host.items() if k not in terms}
        elapsed = time.perf_counter() - started
        record = {"task": task.name, "task_index": task.index, "step": update + 1, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "seconds": elapsed, **stats, **{k: host[k] for k in terms}}
        if task.replayed:
            record["replayed_examples"] = task.replayed
        if bad:
            skipped += 1
            log(record | {"skipped": True, "nonfinite": bad})
            _stop_if_needed(training, method.name, record, bad, skipped, plan.updates)
        else:
            losses.append(loss)
            log(record)
        if bar is not None:
            progress.update(bar, advance=1, loss=loss, rate=(update + 1 - start) / max(elapsed, 1e-9))
        _checkpoint_or_stop(engine, method, checkpoints, task.name, update + 1, plan.updates, skipped)
    engine.destroy()
    for p in params.values():  # the adapter is frozen next: free its gradient buffers
        p.grad = None
    return {"updates": plan.updates, "skipped": skipped, "final_loss": losses[-1] if losses else float("nan"),
            "seconds": time.perf_counter() - started}

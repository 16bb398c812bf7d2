"""The measuring side of `cl-flat bench` (the orchestration, rounds and ratios: `cl_flat.recipes.bench`):
`measure` times one variant in this process (or process group) through the update training runs
(`train.one_update`: `method.window` over the micro-batches, then the step with its non-finite check and
one host sync, on a DeepSpeed engine), and reads its peak memory (the CUDA allocator's peak on GPU, the
process's peak resident memory on CPU). A fixed synthetic batch of micro_batch_size × max_seq_length tokens
(every token a target) is reused, so only the method's cost differs. Reported: the median over the timed
updates after warm-up, and the peak memory at that point. Then, for a variant with a flatness method,
`none` and the method alternate in the same process (same engine, same heap), in quartets none, method,
method, none (`quartet_ratio`: a steady drift of the process's speed cancels) for about as many updates again:
`paired_time_ratio` is the median of the quartets' ratios; the floor alternates likewise with `none` on an
engine built after its timing (`paired_time_ratio`: floor over none). One more update is run under
`opcount.DeviceWork`: its device ops (aten ops that launch a kernel on a GPU) and host syncs, counted the
same on a CPU, so a CPU user can read them as the launch and sync overhead a GPU will show (`device_ops_per_update`,
`host_syncs_per_update`).

Two variants are not the tool's training: `floor` is a hand-written torch + peft AdamW step on the same
model and batch (no DeepSpeed, no tool code), and `rwp_full_stored_noise` is RWP with noise on the whole
model implemented naively (every layer's ε drawn, stored and added in place, as the reference code does),
to show what not storing the noise saves. Variants whose label ends in `_2ranks` run in two processes.

The evaluation rows (`EVAL_ROWS`, `measure_evaluation`) time `evaluate.evaluate_tasks` on the config's model
with one LoRA adapter, over a synthetic task of `evaluation.batch_size` examples (one batch): prompts of about
max_seq_length tokens and ten multi-word labels, scored by rank classification (`accuracy`) or by greedy
generation of up to `evaluation.max_new_tokens` tokens (`exact_match`). Reported: examples per second of the
median pass after warm-up.

Run as a worker: python -m cl_flat.bench CONFIG LABEL UPDATES WARMUP OUT (writes the JSON result to OUT).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cl_flat import dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import load_config
from cl_flat.data.plan import BatchShape, TaskPlan
from cl_flat.data.sources import Example, TaskData
from cl_flat.evaluate import evaluate_tasks
from cl_flat.flatness import FlatnessMethod, build_method
from cl_flat.flatness.noise import frozen_targets
from cl_flat.loss import target_loss, target_split_losses
from cl_flat.models import load_run_model
from cl_flat.opcount import DeviceWork, optimizer_host_tensors
from cl_flat.precision import Compute, compute_dtype
from cl_flat.registry import METHODS
from cl_flat.train import EngineContext, StepRule, create_engine, one_update

VARIANTS: dict[str, tuple[dict[str, Any] | None, int]] = {
    "none": ({"method": "none"}, 1),
    "floor": (None, 1),
    "sam": ({"method": "sam", "rho": 0.05}, 1),
    "asam": ({"method": "sam", "rho": 0.5, "adaptive": True}, 1),
    "rwp_lora": ({"method": "rwp", "scope": "lora"}, 1),
    "rwp_full": ({"method": "rwp", "scope": "full"}, 1),
    "rwp_base": ({"method": "rwp", "scope": "base"}, 1),
    "rwp_full_one_pass": ({"method": "rwp", "scope": "full", "two_batch": True, "one_pass": True}, 1),
    "rwp_full_stored_noise": ({"method": "rwp", "scope": "full"}, 1),
    "lpf_sgd": ({"method": "lpf_sgd"}, 1),
    "flat_lora": ({"method": "flat_lora"}, 1),
    "gsam": ({"method": "gsam"}, 1),
    "looksam": ({"method": "looksam", "interval": 5}, 1),
    "none_2ranks": ({"method": "none"}, 2),
    "rwp_parallel_2ranks": ({"method": "rwp", "scope": "full", "parallel": True}, 2),
}


def variants() -> dict[str, tuple[dict[str, Any] | None, int]]:
    """The labels `cl-flat bench --methods` accepts: the presets above, then every other registered
    method (an installed plugin's included) under its own name with its defaults, on one process."""
    return VARIANTS | {name: ({"method": name}, 1) for name in METHODS.names() if name not in VARIANTS}


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(config, vocab_size: int, device) -> list[dict[str, torch.Tensor]]:
    t = config.training
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(t.gradient_accumulation_steps):
        ids = torch.randint(0, vocab_size, (t.micro_batch_size, t.max_seq_length), generator=generator)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    return batches


class StoredNoiseRwp(FlatnessMethod):
    """The naive full-scope RWP the benchmark compares against (never registered, never used for
    training): every adapted layer's ε is drawn, stored and added to W0 in place, then subtracted.
    The task hooks are the interface's defaults (nothing to prepare or keep)."""

    name = "rwp_full_stored_noise"
    formula = "RWP scope full with ε stored"

    def window(self, ctx, micro_batches):
        n, a, b = len(micro_batches), self.config.a, self.config.b
        for batch in micro_batches:
            ctx.accumulate(batch, a / n, last=False)
        weights = [target.weight for target in frozen_targets(ctx.module)]
        stored = [torch.randn_like(w) * self.config.noise_std for w in weights]
        with torch.no_grad():
            for w, e in zip(weights, stored):
                w.add_(e)
        try:
            ctx.accumulate(micro_batches[-1], b, last=True)
        finally:
            with torch.no_grad():
                for w, e in zip(weights, stored):
                    w.sub_(e)
        return {"loss": 0.0}


def floor_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The floor's optimizer: torch AdamW on its multi-tensor path (torch's own default for CUDA parameters,
    asked for explicitly so a CPU runs it too)."""
    return torch.optim.AdamW(params, lr=lr, foreach=True)


def floor_update(peft_model: torch.nn.Module, params: list[torch.nn.Parameter], optimizer, batches, bf16: bool,
                 max_grad_norm: float | None) -> float:
    """One update of the floor, as a user would hand-write it with torch + peft (no DeepSpeed, no tool code):
    forward (under autocast(bfloat16) for bf16, the adapter in fp32 as peft creates it) and backward of each
    micro-batch, clipping (torch's multi-tensor clip_grad_norm_), the optimizer step, gradients set to None,
    and the loss read on the host (the loop's one host sync)."""
    device = next(peft_model.parameters()).device
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(**batch).loss / len(batches)
        loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _device_work(update: Callable[[], Any], optimizer) -> dict[str, int]:
    """One update under `opcount.DeviceWork`: the aten ops that launch device kernels and the host syncs
    (transformers' causal-mask check, once per forward, included), as a GPU would see them."""
    with DeviceWork(optimizer_host_tensors(optimizer)) as work:
        update()
    ops, syncs = work.total()
    return {"device_ops_per_update": ops, "host_syncs_per_update": syncs}


class _FloorTimer:
    """Timed updates of the floor (`floor_update`) on the adapter, with an optimizer of its own."""

    def __init__(self, peft_model: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches, config):
        self.model, self.weights, self.batches, self.config = peft_model, list(params.values()), batches, config
        self.optimizer = floor_optimizer(self.weights, config.training.learning_rate)

    def update(self) -> None:
        floor_update(self.model, self.weights, self.optimizer, self.batches, self.config.deepspeed.bf16,
                     self.config.training.max_grad_norm)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.update()
        _synchronize()
        return time.perf_counter() - start

    def device_work(self) -> dict[str, int]:
        return _device_work(self.update, self.optimizer)


class _EngineTimer:
    """Updates of the adapter on one DeepSpeed engine, each run as training runs it (`train.one_update`) and
    timed on the slowest rank."""

    def __init__(self, config, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches,
                 total: int):
        plan = TaskPlan(BatchShape.of(config.training, dist.world_size()), total, total)
        self.engine = create_engine(config.training, config.deepspeed, model, list(params.values()), plan)
        self.config, self.params, self.batches, self.total = config, params, batches, total
        self.rule = StepRule.of(config.training, config.deepspeed)
        self.compute = Compute(self.engine.module, compute_dtype(config.deepspeed.bf16))

    def begin(self, method: FlatnessMethod) -> FlatnessMethod:
        method.begin_task(self.engine.module)
        return method

    def update(self, method: FlatnessMethod, step: int) -> None:
        ctx = EngineContext(self.engine, target_loss, self.params, step=step, total_steps=self.total,
                            seed=self.config.run.seed, rank=dist.rank(), world_size=dist.world_size(),
                            split_loss_fn=target_split_losses, compute=self.compute)
        one_update(self.engine, method, ctx, self.batches, self.rule)  # window, non-finite check, step

    def __call__(self, method: FlatnessMethod, step: int) -> float:
        start = time.perf_counter()
        self.update(method, step)
        _synchronize()
        return max(dist.all_gather_objects(time.perf_counter() - start))  # the slowest rank

    def device_work(self, method: FlatnessMethod, step: int) -> dict[str, int]:
        return _device_work(lambda: self.update(method, step), self.engine.optimizer)


def quartets(updates: int) -> int:
    """How many (baseline, timed, timed, baseline) quartets stand for `updates` timed pairs."""
    return (updates + 1) // 2


def quartet_ratio(timed: Callable[[], float], baseline: Callable[[], float], count: int) -> float:
    """timed/baseline from `count` quartets baseline, timed, timed, baseline (each call one timed update):
    Σtimed/Σbaseline per quartet, the median over quartets. A process whose updates slow down (or speed up)
    steadily biases a fixed baseline-then-timed order by one update's drift; in a quartet both sides sit at
    the same mean position, so a drift linear in the update count cancels exactly."""
    ratios = []
    for _ in range(count):
        first = baseline()
        spent = timed() + timed()
        ratios.append(spent / (first + baseline()))
    return statistics.median(ratios)


def _paired_ratio(timer: _EngineTimer, method: FlatnessMethod, step: int, updates: int) -> float:
    """`none` and the method alternate on the same engine (`quartet_ratio`), immune to the ±5-10% by which
    fresh processes on a shared machine differ."""
    baseline, steps = timer.begin(build_method({"method": "none"})), itertools.count(step)
    return quartet_ratio(lambda: timer(method, next(steps)), lambda: timer(baseline, next(steps)), quartets(updates))


def _paired_floor_ratio(floor: _FloorTimer, timer: _EngineTimer, updates: int) -> float:
    """The floor and `none` alternate on the same model and adapter (after one untimed `none` update, the
    engine's first; `quartet_ratio`): floor/none. Each side starts its update with the gradients its own
    loop leaves: none for the floor (it sets them to None), the engine's kept buffers for `none` (zeroed in
    place on a CPU; None on a GPU), put back untimed."""
    baseline = timer.begin(build_method({"method": "none"}))
    timer(baseline, 0)
    kept, steps = [p.grad for p in floor.weights], itertools.count(1)

    def floor_update() -> float:
        for p in floor.weights:
            p.grad = None
        seconds = floor()
        for p, grad in zip(floor.weights, kept):
            p.grad = grad
        return seconds

    return quartet_ratio(floor_update, lambda: timer(baseline, next(steps)), quartets(updates))


def measure(config_path: str, label: str, updates: int, warmup: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One variant in this process (or this process group): median s/update and peak memory. `overrides`:
    the bench's --set (never flatness.*: the variant sets it)."""
    flatness, _ = variants()[label]
    dist.init_distributed()
    world = dist.world_size()
    if not torch.cuda.is_available() and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = load_config(config_path, [*overrides, *([] if flatness is None else [f"flatness={json.dumps(flatness)}"])])
    model, _ = load_run_model(config.model, config.deepspeed, config.run.seed)
    device = dist.device()
    model.to(device)
    stack = AdapterStack(model, config.lora, config.run.seed)
    stack.add_task(0, config.tasks[0].name)
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    batches = _batches(config, model.config.vocab_size, device)
    paired = flatness is not None and flatness["method"] != "none"  # also timed against `none`, see below
    if flatness is None:
        floor = _FloorTimer(stack.model, params, batches, config)
        times = [floor() for _ in range(warmup + updates)]
        work = floor.device_work()
    else:
        method = StoredNoiseRwp(config.flatness) if label == "rwp_full_stored_noise" else build_method(config.flatness)
        pairs = 4 * quartets(updates) if paired else 0
        timer = _EngineTimer(config, stack.model, params, batches, warmup + updates + 1 + pairs)
        timer.begin(method)
        times = [timer(method, step) for step in range(warmup + updates)]
    timed = times[warmup:]
    peak = max(dist.all_gather_objects(_peak_memory()))
    if flatness is not None:  # one more update, counted (after the timing: the counting slows it)
        work = timer.device_work(method, warmup + updates)
    result = {"seconds_per_update": statistics.median(timed), "peak_memory_bytes": peak, "updates": len(timed),
              "ranks": world, **work}
    # the pairs with `none` come after the memory reading, so `none` cannot raise this variant's peak
    if paired:
        result["paired_time_ratio"] = _paired_ratio(timer, method, warmup + updates + 1, updates)
    elif flatness is None:
        engine = _EngineTimer(config, stack.model, params, batches, 1 + 2 * quartets(updates))
        result["paired_time_ratio"] = _paired_floor_ratio(floor, engine, updates)
    return result


EVAL_ROWS = {"eval_rank_classification": "accuracy", "eval_exact_match": "exact_match"}
EVAL_LABELS = ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean Of Transportation",
               "Building", "Natural Place", "Village", "Animal")


def eval_task(metric: str, examples: int, words: int) -> TaskData:
    """The synthetic task the evaluation rows score: `examples` prompts of `words` random words (fixed draw)
    and the ten multi-word `EVAL_LABELS`."""
    rng = random.Random(0)
    vocabulary = "the a river town school team player company museum village mountain animal bus built".split()
    test = tuple(Example(" ".join(rng.choice(vocabulary) for _ in range(words)), EVAL_LABELS[i % len(EVAL_LABELS)])
                 for i in range(examples))
    return TaskData("bench_eval", "Which category fits the text?", EVAL_LABELS, metric,
                    "{instruction} Options: {options}.\nText: {input}\nCategory:", (), test)


def measure_evaluation(config_path: str, label: str, updates: int, warmup: int,
                       overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One evaluation row in this process: `warmup` then `updates` timed passes of `evaluate_tasks` over one
    batch of the synthetic task (`eval_task`); examples per second of the median pass."""
    config = load_config(config_path, list(overrides))
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    device = dist.device()
    model.to(device)
    stack = AdapterStack(model, config.lora, config.run.seed)
    stack.add_task(0, config.tasks[0].name)
    examples = config.evaluation.batch_size
    task = eval_task(EVAL_ROWS[label], examples, config.training.max_seq_length)
    section = config.evaluation.model_copy(update={"max_samples_per_task": None})
    times = []
    for _ in range(warmup + updates):
        start = time.perf_counter()
        evaluate_tasks(stack.model, tokenizer, [task], section, config.training.max_seq_length, config.run.seed, device)
        _synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[warmup:])
    return {"examples_per_second": examples / seconds, "seconds_per_pass": seconds, "examples": examples,
            "updates": updates, "peak_memory_bytes": _peak_memory(), "ranks": 1}


if __name__ == "__main__":  # worker: python -m cl_flat.bench CONFIG LABEL UPDATES WARMUP OUT [OVERRIDE ...]
    config_arg, label_arg, updates_arg, warmup_arg, out_arg = sys.argv[1:6]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = measure_evaluation if label_arg in EVAL_ROWS else measure
    outcome = run(config_arg, label_arg, int(updates_arg), int(warmup_arg), sys.argv[6:])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_arg).write_text(json.dumps(outcome))
    dist.shutdown()
    # Skip the interpreter's teardown: with two gloo ranks, destroying the engines' leftover C++ threads
    # there aborted ("terminate called without an active exception", SIGABRT) in about one worker run in
    # five under pytest, after the result was written. Nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

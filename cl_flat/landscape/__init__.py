"""Loss landscapes (1-D / 2-D, filter-normalised), average- / worst-case sharpness and the Hessian's top
eigenvalue and trace of a run's tasks.

`geometry`: directions, filter normalisation, orthogonalisation, the sharpness estimator (pure);
`hessian`: power iteration and the Hutchinson trace from Hessian-vector products (pure);
`perturbed_loss`: which weights move, the loss at θ + ε and Hv (nothing is written); this module: the
options, the flatness after each task (`compute_sharpness`) and one task's landscape
(`measure_landscape`). `cl_flat.recipes.landscape` (`cl-flat landscape`) runs them on a saved run's
adapter stacks and writes the files.

**Directions.** `random` (default): both axes are filter-normalised Gaussian directions.
`worst`: the first axis is the worst-case perturbation the sharpness ascent found (the ε of
`worst`), filter-normalised like a random direction (row i rescaled to ‖W_i‖), so alpha = ρ lies on
the sharpness ball's boundary in the worst direction; the second axis (2-D) is a random direction
orthogonalised to it. This is the "worst-direction" landscape of the method write-ups (find V_i, then
V_j ⟂ V_i, plot L(W + a·V_i + b·V_j)).

**Hessian.** H = ∇²L w.r.t. the weights the space moves (adapter: the adapter's A and B; merged: the
W0 of every adapted layer, i.e. the merged weight), in plain parameter coordinates (not
filter-normalised), at the trained point, on the same held-out sample. λ_max by power iteration (at most
hessian_iters products, relative tolerance hessian_tol), tr(H) by Hutchinson over hessian_probes
Rademacher vectors with its standard error; the vectors come from a generator keyed by (seed,
"hessian", task, space), the same on every rank, and every Hv is all-reduced.

**Options** (`LandscapeOptions`, the flags of `cl-flat landscape`, validated like the config):
space, rho, samples, ascent_steps, hessian_iters, hessian_tol, hessian_probes and the held-out cap
default to the run's `evaluation` section (sharpness_space, sharpness_rho, sharpness_samples,
sharpness_ascent_steps, hessian_*, landscape_samples()). Grid: alpha (and beta) = linspace(−1, 1,
points). Directions are drawn from generators keyed by (seed, "landscape" | "sharpness", task, space)
— the same draws for every `after` (`cl_flat.seeding`).

**Cost** (passes over the held-out sample). `measure_landscape` (1-D, P points, M samples, K
ascent steps): L(θ) once (shared by the grid origin and the sharpness baseline), P − 1 grid
forwards (P odd), M forwards, K forward+backward, 1 forward for the last ascent iterate: for
P = 21, M = 8, K = 5, 30 forwards + 5 forward+backward. `compute_sharpness` (after each task):
1 + M + 1 forwards + K forward+backward. Both add the power iterations run (≤ hessian_iters) plus
hessian_probes Hessian-vector products: one forward and one backward with create_graph build ∇L's graph
once, each product is then one backward through it (attention in torch's math kernel; the graph of the
whole sample is held meanwhile). Both report their counts under "passes".

**Files** (results folder): `landscape/<stem>_1d.csv` (alpha,loss), `landscape/<stem>_2d.csv`
(alpha,beta,loss), `plots/landscape_<stem>_{1d,2d}.png`, and the entry `<stem>` of
`landscape/sharpness.json` = {"avg", "worst", "rho", "samples", "lambda_max", "lambda_dominant", "trace",
"trace_se", "hessian_iters", "hessian_probes", ...}, with stem = `<task>` for the
landscape of task T right after T was trained in the `adapter` space, `<task>_after_<X>` with
`--after X` (X later than T), a `_merged` suffix for the merged space and a `_worst` suffix for the
worst-direction landscape (e.g. `t1_after_t3_merged_worst_1d.csv`); the sharpness entry has no
`_worst` (both landscapes share it). All written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from cl_flat import dist
from cl_flat.config import EvaluationSection, Strict
from cl_flat.landscape.geometry import (
    SharpnessEstimate,
    combine,
    dot,
    estimate_sharpness,
    filter_normalize,
    filter_rows,
    l2_norm,
    loss_surface,
    orthogonalize,
    project_rows,
    radius_norm,
    random_direction,
    reference_norms,
    row_radii,
    sharpness_passes,
)
from cl_flat.landscape.hessian import hutchinson_trace, top_eigenvalue
from cl_flat.landscape.perturbed_loss import Moved, PerturbedLoss, held_out_batches, moved_weights, unwrap_engine
from cl_flat.progress import counter
from cl_flat.seeding import keyed_generator

__all__ = [
    "LandscapeOptions", "Moved", "PerturbedLoss", "SharpnessEstimate", "Surface",
    "combine", "compute_sharpness", "dot", "estimate_sharpness", "filter_normalize", "filter_rows",
    "held_out_batches", "l2_norm", "landscape_stem", "loss_surface", "measure_landscape", "moved_weights",
    "orthogonalize", "project_rows", "radius_norm", "random_direction", "reference_norms", "resolved", "row_radii",
    "sharpness_passes",
]


class LandscapeOptions(Strict):
    """The options of `cl-flat landscape` (None: the run's `evaluation` value)."""

    task: str | None = None
    after: str | None = None
    dims: Literal[1, 2] = 1
    points: int = Field(default=21, ge=2)
    space: Literal["adapter", "merged"] | None = None
    split: Literal["test", "train"] = "test"
    rho: float | None = Field(default=None, gt=0)
    samples: int | None = Field(default=None, ge=1)
    ascent_steps: int | None = Field(default=None, ge=0)
    max_samples: int | None = Field(default=None, ge=1)
    direction: Literal["random", "worst"] = "random"
    hessian_iters: int | None = Field(default=None, ge=0, le=1000)
    hessian_tol: float | None = Field(default=None, gt=0, lt=1)
    hessian_probes: int | None = Field(default=None, ge=0, le=1000)


def resolved(options: LandscapeOptions, evaluation: EvaluationSection) -> LandscapeOptions:
    """`options` with every unset value taken from the run's evaluation section."""
    return options.model_copy(update={
        "space": options.space or evaluation.sharpness_space,
        "rho": evaluation.sharpness_rho if options.rho is None else options.rho,
        "samples": evaluation.sharpness_samples if options.samples is None else options.samples,
        "ascent_steps": evaluation.sharpness_ascent_steps if options.ascent_steps is None else options.ascent_steps,
        "max_samples": evaluation.landscape_samples() if options.max_samples is None else options.max_samples,
        **{k: getattr(evaluation, k) if getattr(options, k) is None else getattr(options, k)
           for k in ("hessian_iters", "hessian_tol", "hessian_probes")}})


# ---------------------------------------------------------------- sharpness


def _sharpness(evaluator: PerturbedLoss, moved: list[Moved], options: LandscapeOptions, generator: torch.Generator,
               advance: Callable[[], None] | None = None, base: float | None = None) -> SharpnessEstimate:
    norms = {m.name: m.norms for m in moved}
    shapes = {m.name: m.shape for m in moved}
    return estimate_sharpness(evaluator, lambda: random_direction(norms, shapes, generator),
                              row_radii(norms, options.rho), options.samples, loss_and_grad=evaluator.loss_and_grad,
                              ascent_steps=options.ascent_steps, base=base, advance=advance)


def _sharpness_record(est: SharpnessEstimate, options: LandscapeOptions, examples: int,
                      tokens: float) -> dict[str, Any]:
    """The sharpness.json entry (and the passes over the held-out sample so far)."""
    record = {"avg": est.avg, "worst": est.worst, "rho": options.rho, "samples": options.samples,
              "radius": est.radius, "loss": est.base, "ascent_steps": options.ascent_steps, "ball": "filter-wise",
              "space": options.space, "split": options.split, "examples": examples, "target_tokens": int(tokens)}
    if options.after is not None and options.after != options.task:
        record["after"] = options.after
    return record


def _hessian(evaluator: PerturbedLoss, moved: list[Moved], options: LandscapeOptions, generator: torch.Generator,
             advance: Callable[[], None]) -> dict[str, Any]:
    """The Hessian entries of the sharpness.json record: λ_max by power iteration (at most hessian_iters
    products), the Hutchinson trace over hessian_probes Rademacher probes and its standard error
    (`cl_flat.landscape.hessian`); None where the count is 0 (trace_se also for one probe)."""
    shapes = {m.name: m.shape for m in moved}

    record: dict[str, Any] = {"lambda_max": None, "lambda_dominant": None, "trace": None, "trace_se": None,
                              "hessian_iters": options.hessian_iters, "hessian_tol": options.hessian_tol,
                              "hessian_probes": options.hessian_probes, "power_iterations": 0,
                              "lambda_converged": None}
    if not (options.hessian_iters or options.hessian_probes):
        return record
    with evaluator.hessian() as product:
        def hvp(v):
            out = product(v)
            advance()
            return out

        if options.hessian_iters:
            top = top_eigenvalue(hvp, shapes, generator, iters=options.hessian_iters, tol=options.hessian_tol)
            record.update(lambda_max=top.value, lambda_dominant=top.dominant, power_iterations=top.iterations,
                          lambda_converged=top.converged)
        if options.hessian_probes:
            trace = hutchinson_trace(hvp, shapes, generator, probes=options.hessian_probes)
            record.update(trace=trace.value, trace_se=trace.se)
    return record


def _passes(evaluator: PerturbedLoss) -> dict[str, int]:
    return {"forward": evaluator.evaluations - evaluator.gradients, "forward_backward": evaluator.gradients,
            "hessian_vector": evaluator.products}


def compute_sharpness(model: nn.Module, tokenizer, task, adapter: str, evaluation: EvaluationSection, *,
                      max_length: int, seed: int, options: LandscapeOptions | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """Average- and worst-case sharpness of the live `model` (a peft model, or the DeepSpeed
    engine wrapping it) on `task` (TaskData), perturbing adapter `adapter` (space `adapter`) or
    the merged weights (space `merged`). Settings: `options` over the run's `evaluation` section;
    `seed` is the run seed, `max_length` training.max_seq_length.

    Collective under torch.distributed: every rank must call it (the sample is sharded, sums are
    all-reduced; every rank returns the same dict). The model is left bit for bit unchanged
    (parameters, requires_grad, .grad, train/eval mode). Returns the sharpness.json record
    {"avg", "worst", "rho", "samples", "radius", "loss", "ascent_steps", "ball", "space", "split",
    "examples", "target_tokens", "lambda_max", "lambda_dominant", "trace", "trace_se", "hessian_iters",
    "hessian_tol", "hessian_probes", "power_iterations", "lambda_converged"} (+ "after" when options.after is another
    task) plus "passes": {"forward", "forward_backward", "hessian_vector"}."""
    options = resolved(options or LandscapeOptions(), evaluation)
    inner = unwrap_engine(model)
    device = next(inner.parameters()).device
    moved = moved_weights(inner, options.space, adapter)
    batches = held_out_batches(task, tokenizer, evaluation, max_length=max_length, seed=seed, split=options.split,
                               max_samples=options.max_samples, device=device)
    evaluator = PerturbedLoss(inner, batches, moved)
    examples = int(dist.all_reduce_sum(torch.tensor(float(sum(len(b["input_ids"]) for b in batches)),
                                                    device=device)).item())
    generator = keyed_generator(seed, "sharpness", task.name, options.space, device=device)
    forwards, backwards = sharpness_passes(options.samples, options.ascent_steps)
    products = options.hessian_iters + options.hessian_probes
    with counter(progress, f"flatness {task.name}", forwards + backwards + products) as advance:
        est = _sharpness(evaluator, moved, options, generator, advance)
        hessian = _hessian(evaluator, moved, options, keyed_generator(seed, "hessian", task.name, options.space,
                                                                      device=device), advance)
    return _sharpness_record(est, options, examples, evaluator.tokens) | hessian | {"passes": _passes(evaluator)}


# ---------------------------------------------------------------- the landscape of one task


def landscape_stem(task: str, after: str | None = None, space: str = "adapter", direction: str = "random") -> str:
    """`<task>`, `<task>_after_<X>` (X != task), plus `_merged` for the merged space and `_worst` for
    the worst-direction landscape."""
    stem = task if after is None or after == task else f"{task}_after_{after}"
    stem = stem if space == "adapter" else f"{stem}_{space}"
    return stem if direction == "random" else f"{stem}_{direction}"


@dataclass(frozen=True)
class Surface:
    """The loss landscape and sharpness `measure_landscape` found (nothing written)."""

    coords: list[tuple[float, ...]]  # the grid points, in csv order
    losses: list[float]              # the loss at each of them
    loss: float                      # L(θ), unperturbed
    sharpness: dict[str, Any]        # the sharpness.json record
    passes: dict[str, int]           # passes over the held-out sample: forward, forward_backward
    examples: int                    # held-out examples


def measure_landscape(model: nn.Module, batches: list[dict[str, torch.Tensor]], task: str, adapter: str,
                      options: LandscapeOptions, *, seed: int, after: str, progress: bool = False) -> Surface:
    """Loss landscape and sharpness of `task` on `batches` (its held-out sample, this process alone),
    perturbing adapter `adapter` (space `adapter`) or the merged weights; `options` resolved (`resolved`),
    `after` the task whose stack `model` holds. Directions are keyed by (run seed, task, space)."""
    moved = moved_weights(model, options.space, adapter)
    evaluator = PerturbedLoss(model, batches, moved)
    norms = {m.name: m.norms for m in moved}
    shapes = {m.name: m.shape for m in moved}
    device = next(model.parameters()).device
    grid = [-1.0 + 2.0 * i / (options.points - 1) for i in range(options.points)]
    coords = [(a,) for a in grid] if options.dims == 1 else [(a, b) for a in grid for b in grid]
    origin = sum(all(c == 0.0 for c in cs) for cs in coords)
    forwards, backwards = sharpness_passes(options.samples, options.ascent_steps, base=False)
    stem = landscape_stem(task, after, options.space, options.direction)
    products = options.hessian_iters + options.hessian_probes
    with counter(progress, f"landscape {stem}", 1 + len(coords) - origin + forwards + backwards + products) as advance:
        # L(θ) once: the grid's origin and the sharpness baseline reuse it; sharpness first, since
        # the worst-direction landscape runs along the ε it finds
        base = evaluator(None)
        advance()
        est = _sharpness(evaluator, moved, options, keyed_generator(seed, "sharpness", task, options.space,
                                                                    device=device), advance, base=base)
        generator = keyed_generator(seed, "landscape", task, options.space, device=device)
        if options.direction == "worst":
            first = {k: filter_rows(v, norms[k]) for k, v in est.worst_perturbation.items()}
        else:
            first = random_direction(norms, shapes, generator)
        directions = [first]
        if options.dims == 2:
            directions.append(orthogonalize(random_direction(norms, shapes, generator), first, norms))
        losses = loss_surface(lambda eps: base if eps is None else evaluator(eps), directions, coords, advance)
        hessian = _hessian(evaluator, moved, options, keyed_generator(seed, "hessian", task, options.space,
                                                                      device=device), advance)
    examples = sum(len(b["input_ids"]) for b in batches)
    record = _sharpness_record(est, options.model_copy(update={"after": after}), examples, evaluator.tokens) | hessian
    return Surface(coords, losses, base, record, _passes(evaluator), examples)

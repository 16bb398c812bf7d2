"""Loss landscapes (1-D / 2-D, filter-normalised) and average- / worst-case sharpness.

Conventions (what the numbers mean)
-----------------------------------
**Which weights move.** A perturbation ε lives in one of two spaces; everything else is fixed.
- `adapter`: the A (r × n_in) and B (n_out × r) matrices of ONE adapter (the task's own
  adapter for IncLoRA, the shared `seqlora` adapter for SeqLoRA) in every adapted layer. The
  base model and the other adapters of the stack do not move. Rows of A and rows of B are
  normalised to their own rows. (A B that is still 0 gets no perturbation; only A moves then.)
- `merged`: the merged weight W' = W0 + Σ_k s_k B_k A_k (k over the active adapters of the
  stack) of every adapted layer, as Flat-LoRA draws its noise. Direction rows are normalised to
  ‖W'_i‖. The perturbation is applied to W0 inside the forward pass (W0 + ε, the adapters on
  top unchanged), which is exactly W' + ε.
Biases, norm weights, embeddings and non-adapted layers never move.

**Nothing is written.** Perturbed weights are handed to `torch.func.functional_call` as new
tensors (value + ε); the model's parameters, their `requires_grad` flags and `.grad` fields are
untouched (gradients for the ascent come from `torch.autograd.grad` w.r.t. ε only), and the
train/eval mode is restored. A live (DeepSpeed-trained) model is left bit for bit as it was.

**Directions** (Li et al. 2018). z ~ N(0, I) drawn from a dedicated `torch.Generator` seeded
with `derive_seed(seed, "landscape"|"sharpness", task, space)` (never the global RNG), tensors
visited in sorted parameter-name order; then filter normalisation per output row
d_i = z_i / ‖z_i‖ · ‖W_i‖ (rows = dim 0; for a transposed Conv1D base weight, its columns).
So each row of d is uniform on the sphere of radius ‖W_i‖ (independently per row), and
‖d‖₂ = ‖W‖_F exactly. 1-D tensors (biases, norms) get 0.
2-D: the second direction is Gram-Schmidt orthogonalised to the first ROW BY ROW
(d2_i ← d2_i − ⟨d2_i, d1_i⟩/‖d1_i‖² · d1_i), then re-filter-normalised. Row-wise orthogonality
implies ⟨d1, d2⟩ = 0 over the whole vector, and rescaling rows keeps it, so d2 is exactly
orthogonal to d1 AND exactly filter-normalised (whole-vector Gram-Schmidt followed by
re-normalisation would only be approximately orthogonal). A row of length 1 cannot be
orthogonalised and stays 0 in d2.
Grid: alpha (and beta) = linspace(−1, 1, points); the loss at (α, β) is L(θ + α d1 + β d2).

**Loss.** Mean target-token cross-entropy (the training loss: label tokens + EOS, prompt and
padding ignored), token-weighted over a fixed held-out sample: split `test` (default) or
`train`, capped by min(`evaluation.max_samples_per_task`, LANDSCAPE_MAX_SAMPLES = 8) unless
`max_samples` / `--max-samples` says otherwise, with the same fixed permutation as the
accuracy evaluation (`cl_flat.evaluate.eval_indices`), encoded once, batched by
`evaluation.batch_size`, collated once and reused at every grid point. Logits are computed
only at target positions when the model supports `logits_to_keep`. Sharded over ranks (each
rank sums its slice; sums all-reduced), so every rank gets the same value.

**Sharpness** — filter-wise (adaptive) geometry, the same as the directions'. ρ is RELATIVE
and PER ROW: row i of every moved tensor may move by at most r_i = ρ‖W_i‖ (W = the moved
weights of the space; for `merged`, W'), i.e. the ball is
U = {ε : ‖ε_i‖ ≤ ρ‖W_i‖ for every row i} = {ε : ‖T_W⁻¹ ε‖_{2,∞} ≤ ρ}, T_W = diag(‖W_i‖) per row:
the filter-normalised ("adaptive") sharpness of Kwon et al. 2021 (ASAM, filter-wise T_W) and
Andriushchenko et al. 2023 (adaptive sharpness, tml-epfl/sharpness-vs-generalization), here with
an L2 norm per row. It is invariant to LoRA's rescaling symmetry A → cA, B → B/c, and a
small row (e.g. a LoRA B that is small after training) only moves by ρ times its OWN norm — in
a plain L2 ball of radius ρ‖W‖_F the large rows (A) set the radius and the ascent could push B
by many times its norm. U lies inside that L2 ball (‖ε‖² = Σ‖ε_i‖² ≤ (ρ‖W‖_F)²), so worst-case
values here are ≤ the plain-L2 ones. The record's "radius" is ρ‖W‖_F = the norm of every
random sample (the largest ‖ε‖ in U).
Average case: M directions d_m as above (each row on the sphere of radius ‖W_i‖), ε_m = ρ·d_m
(every row on its sphere ‖ε_i‖ = r_i, on the boundary of U; alpha = ρ on a 1-D landscape is one
sample); avg = (1/M) Σ_m L(θ+ε_m) − L(θ). On a quadratic L = ½ wᵀHw around W (w = vec W),
E[avg] = ρ²/(2n) Σ_i ‖W_i‖² tr(H_ii) (n = row length, H_ii the block of row i); for one row
this is r²·tr(H)/(2n).
Worst case: the larger of max_m L(θ+ε_m) and the best iterate of a projected, per-row
normalised gradient ascent in U, started at the best random ε, `ascent_steps` (config
`evaluation.sharpness_ascent_steps`, default 5) steps ε_i ← Π_i(ε_i + η·ρ‖W_i‖·g_i/‖g_i‖)
(η = 1; Π_i rescales a row that left its ball back onto its sphere — the exact projection onto
U), minus L(θ); so worst ≥ max over the random samples by construction. All losses are on the
same fixed batches. On L = ½ wᵀHw at w = 0 with H block-diagonal over rows (separable),
max_U = Σ_i ½ r_i² λ_max(H_ii); with one row (U = the L2 ball of radius r) it is r²·λ_max/2, and
the ascent approaches it.

**Cost** (passes over the held-out sample, ≤ 8 examples by default). `compute_landscape`
(1-D, P points, M samples, K ascent steps): L(θ) once (shared by the grid origin and the
sharpness baseline), P − 1 grid forwards (P odd), M forwards, K forward+backward, 1 forward for
the last ascent iterate: for P = 21, M = 8, K = 5, 30 forwards + 5 forward+backward (it was 31
forwards + 5 forward+backward over 32 examples). `compute_sharpness` (after each task):
1 + M + 1 forwards + K forward+backward. Both report their counts under "passes".

**Files** (results folder contract): `landscape/<stem>_1d.csv` (alpha,loss),
`landscape/<stem>_2d.csv` (alpha,beta,loss), `plots/landscape_<stem>_{1d,2d}.png`, and the
entry `<stem>` of `landscape/sharpness.json` = {"avg", "worst", "rho", "samples", ...}, with
stem = `<task>` for the landscape of task T right after T was trained in the `adapter` space,
`<task>_after_<X>` with `--after X` (X later than T), and a `_merged` suffix for the merged
space (e.g. `t1_after_t3_merged_1d.csv`). All written atomically (temp file + os.replace).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_flat.files import atomic_write_text
from cl_flat.config import RunConfig, UserError
from cl_flat.data.batches import IGNORE, Encoded, collate, encode_examples
from cl_flat.train import derive_seed

Params = dict[str, torch.Tensor]
SPACES = ("adapter", "merged")
SPLITS = ("test", "train")
SHARPNESS_FILE = "sharpness.json"
# Default cap on held-out examples: every grid point and every sharpness sample is a full pass
# over the sample, so it must stay small. A forward over 8 quickstart examples (SmolLM2-135M,
# ~47 tokens) costs ~0.75 s on the 2-core CPU: the 21-point landscape with M = 8 computes in
# ~29 s, against 47.5 s to train one quickstart task (16 examples: ~46 s, no margin).
# Override with max_samples / --max-samples.
LANDSCAPE_MAX_SAMPLES = 8

__all__ = [
    "filter_normalize", "random_direction", "orthogonalize", "loss_surface", "estimate_sharpness",
    "SharpnessEstimate", "PerturbedLoss", "moved_weights", "row_radii", "radius_norm", "project_rows",
    "sharpness_passes", "held_out_batches", "compute_sharpness",
    "compute_landscape", "landscape_stem", "merge_sharpness", "trained_tasks",
]


# ---------------------------------------------------------------- pure core: vectors as dicts


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def _norm(a: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _combine(terms: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> Params:
    """Σ_k c_k v_k."""
    keys = terms[0][1].keys()
    return {k: sum(c * v[k] for c, v in terms) for k in keys}


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def row_norms(weight: torch.Tensor) -> torch.Tensor | None:
    """‖W_i‖ of each output row (dim 0), in fp32 or wider; None for tensors with fewer than 2 dims."""
    if weight.dim() < 2:
        return None
    return _at_least_fp32(weight.detach()).flatten(1).norm(dim=1)


def _rescale_rows(direction: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    if norms is None:
        return torch.zeros_like(direction)
    rows = direction.flatten(1)
    current = rows.norm(dim=1, keepdim=True)
    scale = torch.where(current > 0, norms.to(rows).unsqueeze(1) / current.clamp_min(1e-30), torch.zeros_like(current))
    return (rows * scale).view_as(direction)


def filter_normalize(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d_i ← d_i/‖d_i‖·‖W_i‖ for every output row i (dim 0); 0 for 1-D tensors (biases,
    norm weights) and for rows where d_i = 0."""
    if direction.shape != weight.shape:
        raise ValueError(f"direction shape {tuple(direction.shape)} != weight shape {tuple(weight.shape)}")
    return _rescale_rows(_at_least_fp32(direction), row_norms(weight))


def random_direction(norms: Mapping[str, torch.Tensor | None], shapes: Mapping[str, torch.Size],
                     generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
    """A filter-normalised Gaussian direction: for each tensor (sorted by name) z ~ N(0, I) from
    `generator`, each row rescaled to `norms[name][i]` (= ‖W_i‖; None -> zeros)."""
    device = generator.device
    out = {}
    for name in sorted(shapes):
        z = torch.randn(tuple(shapes[name]), generator=generator, dtype=dtype, device=device)
        out[name] = _rescale_rows(z, norms[name])
    return out


def orthogonalize(direction: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  norms: Mapping[str, torch.Tensor | None]) -> Params:
    """`direction` made orthogonal to `reference` row by row (Gram-Schmidt per output row), then
    re-filter-normalised to `norms`: exactly orthogonal over the whole vector and exactly
    filter-normalised (see the module docstring)."""
    out = {}
    for name, d in direction.items():
        if d.dim() < 2 or norms[name] is None:
            out[name] = torch.zeros_like(d)
            continue
        a, b = d.flatten(1).double(), reference[name].flatten(1).double()
        bb = (b * b).sum(1, keepdim=True)
        coef = torch.where(bb > 0, (a * b).sum(1, keepdim=True) / bb.clamp_min(1e-300), torch.zeros_like(bb))
        residual = a - coef * b
        if d.shape[1:].numel() == 1:  # length-1 rows: nothing is orthogonal to a non-zero scalar
            residual = torch.where(bb > 0, torch.zeros_like(residual), residual)
        out[name] = _rescale_rows(residual, norms[name].double()).to(d.dtype).view_as(d)
    return out


def loss_surface(loss: Callable[[Params | None], float], directions: Sequence[Mapping[str, torch.Tensor]],
                 coords: Sequence[Sequence[float]], advance: Callable[[], None] | None = None) -> list[float]:
    """L(θ + Σ_k c_k d_k) for every coordinate tuple c (len(c) == len(directions)). The origin
    (every c_k == 0) is asked as loss(None), so a closure that already knows L(θ) (see
    `compute_landscape`) answers it without a pass; `advance` is called once per loss(ε) with ε
    not None."""
    values = []
    for c in coords:
        if len(c) != len(directions):
            raise ValueError(f"coordinate {tuple(c)} has {len(c)} entries for {len(directions)} directions")
        if all(float(ck) == 0.0 for ck in c):
            values.append(float(loss(None)))
            continue
        values.append(float(loss(_combine([(float(ck), d) for ck, d in zip(c, directions)]))))
        if advance is not None:
            advance()
    return values


@dataclass(frozen=True)
class SharpnessEstimate:
    avg: float            # mean_m L(θ+ε_m) − L(θ)
    worst: float          # max(random, ascent) − L(θ)
    base: float           # L(θ)
    radius: float         # sqrt(Σ_i r_i²): ‖ε‖ of every random sample (the largest ‖ε‖ in the ball)
    random: tuple[float, ...]  # L(θ+ε_m) − L(θ), m = 1..M
    ascent: tuple[float, ...]  # L − L(θ) at each ascent iterate (start included)


def row_radii(norms: Mapping[str, torch.Tensor | None], rho: float) -> dict[str, torch.Tensor | None]:
    """Per-row radii r_i = ρ‖W_i‖ of the filter-wise ball (None stays None: that tensor never moves)."""
    return {k: None if n is None else rho * n for k, n in norms.items()}


def radius_norm(radii: Mapping[str, torch.Tensor | None]) -> float:
    """sqrt(Σ_i r_i²) over every row of every tensor (= ρ‖W‖_F for r_i = ρ‖W_i‖)."""
    return math.sqrt(sum(float((r.double() ** 2).sum()) for r in radii.values() if r is not None))


def project_rows(eps: Mapping[str, torch.Tensor], radii: Mapping[str, torch.Tensor | None]) -> Params:
    """Π onto the filter-wise ball {ε : ‖ε_i‖ ≤ r_i for every row i}: each row longer than its
    radius is rescaled onto its sphere, the others are kept; tensors with radius None (and 1-D
    tensors) -> 0. The ball is a product of row balls, so this is the exact Euclidean projection."""
    out = {}
    for k, e in eps.items():
        r = radii[k]
        if r is None or e.dim() < 2:
            out[k] = torch.zeros_like(e)
            continue
        rows = e.flatten(1)
        length = rows.norm(dim=1, keepdim=True)
        limit = r.to(rows).unsqueeze(1)
        scale = torch.where(length > limit, limit / length.clamp_min(1e-30), torch.ones_like(length))
        out[k] = (rows * scale).view_as(e)
    return out


def estimate_sharpness(loss: Callable[[Params | None], float], sample_direction: Callable[[], Params],
                       radii: Mapping[str, torch.Tensor | None], samples: int, *,
                       loss_and_grad: Callable[[Params], tuple[float, Params]] | None = None,
                       ascent_steps: int = 0, step_size: float = 1.0, base: float | None = None,
                       advance: Callable[[], None] | None = None) -> SharpnessEstimate:
    """Average- and worst-case sharpness of `loss` (a closure: perturbation ε -> loss at θ+ε,
    ε = None meaning unperturbed) in the filter-wise ball U = {ε : ‖ε_i‖ ≤ r_i for every row i}
    (`radii[name]` holds r_i per row (dim 0) of tensor `name`; None: the tensor never moves).

    Random part: M = `samples` directions from `sample_direction()`, each row rescaled onto its
    sphere ‖ε_i‖ = r_i (so every sample lies on the boundary of U). Ascent part (needs
    `loss_and_grad`): start at the best random ε, then `ascent_steps` times
    ε_i ← Π_i(ε_i + η r_i g_i/‖g_i‖) row by row (η = `step_size`; rows with g_i = 0 stay), Π_i =
    rescale row i onto its sphere when it leaves its ball; the loss at every iterate counts for
    the worst case, worst = max(random samples, ascent iterates) ≥ max over the random samples.

    Passes: 1 forward for L(θ) (none when `base` is given), M forwards, `ascent_steps`
    forward+backward (the loss at each iterate comes with its gradient) and 1 forward for the
    last iterate."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    tick = advance or (lambda: None)
    if base is None:
        base = float(loss(None))
        tick()
    base = float(base)
    randoms: list[float] = []
    best, best_loss = None, -math.inf
    for _ in range(samples):
        d = sample_direction()
        eps = {k: _rescale_rows(v, radii[k]) for k, v in d.items()}
        value = float(loss(eps))
        randoms.append(value)
        if value > best_loss:
            best, best_loss = eps, value
        tick()
    ascent: list[float] = []
    size = radius_norm(radii)
    if ascent_steps > 0 and loss_and_grad is not None and size > 0:
        eps = best
        for _ in range(ascent_steps):
            value, grad = loss_and_grad(eps)
            ascent.append(float(value))
            tick()
            g = _norm(grad)
            if not math.isfinite(g) or g == 0.0:
                break
            step = {k: _rescale_rows(v, radii[k]) for k, v in grad.items()}  # row i: r_i g_i/‖g_i‖
            eps = project_rows(_combine([(1.0, eps), (step_size, step)]), radii)
        else:
            ascent.append(float(loss(eps)))
            tick()
    worst = max(randoms + ascent)
    return SharpnessEstimate(avg=sum(randoms) / len(randoms) - base, worst=worst - base, base=base, radius=size,
                             random=tuple(v - base for v in randoms), ascent=tuple(v - base for v in ascent))


def sharpness_passes(samples: int, ascent_steps: int, base: bool = True) -> tuple[int, int]:
    """(forward-only passes, forward+backward passes) of `estimate_sharpness` when the ascent
    runs all its steps (`base`: whether L(θ) is computed there rather than handed in)."""
    return int(base) + samples + (1 if ascent_steps > 0 else 0), ascent_steps


# ---------------------------------------------------------------- the model side


@dataclass
class Moved:
    """One tensor that a space perturbs. ε is laid out (out, in) = rows are output channels;
    `transposed` when the parameter itself is stored (in, out) (Conv1D / fan_in_fan_out)."""
    name: str                    # parameter name in model.named_parameters() (the override target)
    value: torch.Tensor          # the parameter (detached view; never written)
    norms: torch.Tensor | None   # ‖W_i‖ per output row of the normalisation reference
    transposed: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.value.T.shape if self.transposed else self.value.shape


def _unwrap(model: nn.Module) -> nn.Module:
    """The trained module inside a DeepSpeed engine (a probe pass must not go through engine hooks)."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" else model


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]


def moved_weights(model: nn.Module, space: str, adapter: str) -> list[Moved]:
    """The tensors `space` perturbs (see the module docstring), sorted by name."""
    model = _unwrap(model)
    if space not in SPACES:
        raise UserError(f"space: expected one of {list(SPACES)}, got {space!r}")
    params = dict(model.named_parameters())
    moved: list[Moved] = []
    with torch.no_grad():
        for name, layer in _lora_layers(model):
            if space == "adapter":
                if adapter not in layer.lora_A:
                    continue
                for part in ("lora_A", "lora_B"):
                    pname = f"{name}.{part}.{adapter}.weight"
                    moved.append(Moved(pname, params[pname].detach(), row_norms(params[pname])))
            else:
                pname = f"{name}.base_layer.weight"
                w0 = params[pname].detach()
                merged = w0.float().clone()
                for a in layer.active_adapters:
                    if a in layer.lora_A:
                        merged += layer.get_delta_weight(a).float()
                transposed = bool(getattr(layer, "fan_in_fan_out", False))
                moved.append(Moved(pname, w0, row_norms(merged.T if transposed else merged), transposed))
    if not moved:
        raise UserError(f"space {space!r}: no weights to perturb (adapter {adapter!r} not found in any LoRA layer)")
    return sorted(moved, key=lambda m: m.name)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def held_out_batches(task, tokenizer, config: RunConfig, split: str = "test", max_samples: int | None = None,
                     device: torch.device | str = "cpu", rank: int | None = None,
                     world: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The fixed held-out sample of `task` (this rank's share; cap: `max_samples`, default
    min(evaluation.max_samples_per_task, LANDSCAPE_MAX_SAMPLES)), encoded as for training
    (prompt + target + EOS), sorted by length, batched by evaluation.batch_size and collated
    once. `keep` marks the positions whose next token is a target; `targets` lists those tokens."""
    from cl_flat import engine as ds
    from cl_flat.evaluate import eval_indices

    if split not in SPLITS:
        raise UserError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    examples = task.test if split == "test" else task.train
    if not examples:
        raise UserError(f"task {task.name!r} has no {split} examples")
    if max_samples is None:
        configured = config.evaluation.max_samples_per_task
        max_samples = LANDSCAPE_MAX_SAMPLES if configured is None else min(configured, LANDSCAPE_MAX_SAMPLES)
    cap = max_samples
    indices = eval_indices(len(examples), cap, config.run.seed, task.name)
    rank = ds.rank() if rank is None else rank
    world = ds.world_size() if world is None else world
    mine = indices[rank::world]
    encoded: list[Encoded] = encode_examples(task, tokenizer, [examples[i] for i in mine],
                                             config.training.max_seq_length)
    encoded.sort(key=lambda e: len(e.input_ids))
    size = config.evaluation.batch_size
    batches = []
    for start in range(0, len(encoded), size):
        batch = collate(encoded[start:start + size], tokenizer.pad_token_id)
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
        batch["keep"] = keep
        batch["targets"] = batch["labels"][:, 1:][keep[:, :-1]]
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


class PerturbedLoss:
    """Mean target-token cross-entropy of `model` at θ + ε on fixed batches, ε applied
    functionally to the `moved` tensors (nothing written). Callable: ε (or None) -> float."""

    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], moved: list[Moved]):
        self.model = _unwrap(model)
        self.batches = batches
        self.moved = {m.name: m for m in moved}
        self.keep_logits = _accepts_logits_to_keep(self.model)
        count = torch.tensor(float(sum(int(b["targets"].numel()) for b in batches)), dtype=torch.float64)
        self.tokens = float(_all_reduce_sum(count.to(self._device())).item())
        if self.tokens == 0:
            raise UserError("the held-out sample has no target tokens")
        self.evaluations = 0  # passes over the sample: forward-only + forward+backward
        self.gradients = 0    # forward+backward passes (loss_and_grad)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _overrides(self, eps: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if eps is None:
            return {}
        out = {}
        for name, delta in eps.items():
            m = self.moved[name]
            delta = delta.T if m.transposed else delta
            out[name] = (m.value.float() + delta).to(m.value.dtype)
        return out

    def _ce_sum(self, batch: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.keep_logits:
            kwargs["logits_to_keep"] = batch["keep"]
        logits = torch.func.functional_call(self.model, overrides, args=(), kwargs=kwargs).logits
        if self.keep_logits:
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = logits[:, :-1][batch["keep"][:, :-1]]
        return F.cross_entropy(logits.float(), batch["targets"], reduction="sum")

    @contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def __call__(self, eps: Mapping[str, torch.Tensor] | None = None) -> float:
        with torch.no_grad(), self._eval_mode():
            overrides = self._overrides(eps)
            total = torch.zeros((), dtype=torch.float64, device=self._device())
            for batch in self.batches:
                total += self._ce_sum(batch, overrides).double()
        self.evaluations += 1
        return float(_all_reduce_sum(total).item()) / self.tokens

    def loss_and_grad(self, eps: Mapping[str, torch.Tensor]) -> tuple[float, Params]:
        """Loss at θ+ε and its gradient w.r.t. ε (torch.autograd.grad: no .grad is touched)."""
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in eps.items()}
        names = sorted(leaves)
        grads = [torch.zeros_like(leaves[k]) for k in names]
        total = torch.zeros((), dtype=torch.float64, device=self._device())
        with torch.enable_grad(), self._eval_mode():
            for batch in self.batches:
                value = self._ce_sum(batch, self._overrides(leaves))
                parts = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
                for acc, part in zip(grads, parts):
                    if part is not None:
                        acc += part
                total += value.detach().double()
        flat = _all_reduce_sum(torch.cat([g.flatten() for g in grads]))
        total = _all_reduce_sum(total)
        self.evaluations += 1
        self.gradients += 1
        out, offset = {}, 0
        for k, g in zip(names, grads):
            out[k] = flat[offset:offset + g.numel()].view_as(g) / self.tokens
            offset += g.numel()
        return float(total.item()) / self.tokens, out


# ---------------------------------------------------------------- progress


@contextmanager
def _progress(enabled: bool, description: str, total: int):
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda: progress.advance(bar)


# ---------------------------------------------------------------- sharpness


def _generator(device: torch.device, *parts: Any) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def _sharpness(evaluator: PerturbedLoss, moved: list[Moved], rho: float, samples: int, ascent_steps: int,
               generator: torch.Generator, advance: Callable[[], None] | None = None,
               base: float | None = None) -> SharpnessEstimate:
    norms = {m.name: m.norms for m in moved}
    shapes = {m.name: m.shape for m in moved}
    return estimate_sharpness(evaluator, lambda: random_direction(norms, shapes, generator), row_radii(norms, rho),
                              samples, loss_and_grad=evaluator.loss_and_grad, ascent_steps=ascent_steps, base=base,
                              advance=advance)


def _sharpness_record(est: SharpnessEstimate, rho: float, samples: int, ascent_steps: int, space: str, split: str,
                      examples: int, tokens: float, after: str | None = None) -> dict[str, Any]:
    record = {"avg": est.avg, "worst": est.worst, "rho": rho, "samples": samples, "radius": est.radius,
              "loss": est.base, "ascent_steps": ascent_steps, "ball": "filter-wise", "space": space, "split": split,
              "examples": examples, "target_tokens": int(tokens)}
    if after is not None:
        record["after"] = after
    return record


def compute_sharpness(model: nn.Module, tokenizer, task, config: RunConfig, adapter: str, *,
                      space: str | None = None, rho: float | None = None, samples: int | None = None,
                      ascent_steps: int | None = None, split: str = "test", max_samples: int | None = None,
                      seed: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Average- and worst-case sharpness of the live `model` (a peft model, or the DeepSpeed
    engine wrapping it) on `task` (TaskData), perturbing adapter `adapter` (space `adapter`) or
    the merged weights (space `merged`). Defaults come from `config.evaluation`
    (sharpness_space, sharpness_rho, sharpness_samples, sharpness_ascent_steps, batch_size; the
    sample cap is min(max_samples_per_task, LANDSCAPE_MAX_SAMPLES) unless `max_samples` is
    given); seed defaults to config.run.seed.

    Collective under torch.distributed: every rank must call it (the sample is sharded, sums are
    all-reduced; every rank returns the same dict). The model is left bit for bit unchanged
    (parameters, requires_grad, .grad, train/eval mode).
    Cost: 1 + `samples` + 1 forward passes and `ascent_steps` forward+backward passes over a
    sample of ≤ 8 examples by default (see the module docstring).
    Returns {"avg", "worst", "rho", "samples", "radius", "loss", "ascent_steps", "ball", "space",
    "split", "examples", "target_tokens", "passes": {"forward", "forward_backward"}}."""
    from cl_flat import engine as ds

    section = config.evaluation
    space = space or section.sharpness_space
    rho = section.sharpness_rho if rho is None else rho
    samples = section.sharpness_samples if samples is None else samples
    ascent_steps = section.sharpness_ascent_steps if ascent_steps is None else ascent_steps
    seed = config.run.seed if seed is None else seed
    inner = _unwrap(model)
    device = next(inner.parameters()).device
    moved = moved_weights(inner, space, adapter)
    batches = held_out_batches(task, tokenizer, config, split, max_samples, device)
    evaluator = PerturbedLoss(inner, batches, moved)
    examples = int(_all_reduce_sum(torch.tensor(float(sum(len(b["input_ids"]) for b in batches)),
                                                device=device)).item())
    show = (config.logging.progress and ds.rank() == 0) if progress is None else progress
    generator = _generator(device, seed, "sharpness", task.name, space)
    forwards, backwards = sharpness_passes(samples, ascent_steps)
    with _progress(show, f"sharpness {task.name}", forwards + backwards) as advance:
        est = _sharpness(evaluator, moved, rho, samples, ascent_steps, generator, advance)
    record = _sharpness_record(est, rho, samples, ascent_steps, space, split, examples, evaluator.tokens)
    record["passes"] = {"forward": evaluator.evaluations - evaluator.gradients,
                        "forward_backward": evaluator.gradients}
    return record


# ---------------------------------------------------------------- files


def landscape_stem(task: str, after: str | None = None, space: str = "adapter") -> str:
    """`<task>`, `<task>_after_<X>` (X != task), plus `_merged` for the merged space."""
    stem = task if after is None or after == task else f"{task}_after_{after}"
    return stem if space == "adapter" else f"{stem}_{space}"


def merge_sharpness(run_dir: Path, key: str, record: Mapping[str, Any]) -> Path:
    """Set entry `key` of <run_dir>/landscape/sharpness.json (other entries kept), atomically."""
    path = Path(run_dir) / "landscape" / SHARPNESS_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data[key] = dict(record)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[float]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[repr(float(v)) for v in row] for row in rows])
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------- run folders


def trained_tasks(run_dir: Path) -> list[str]:
    """Tasks whose training finished (their row is in acc_matrix.csv), in order."""
    from cl_flat.metrics import ZERO_SHOT
    from cl_flat.run import MATRIX_FILE

    path = Path(run_dir) / MATRIX_FILE
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    return [r[0].strip() for r in rows[1:] if r[0].strip() != ZERO_SHOT]


def resolve_tasks(run_dir: Path, config: RunConfig, task: str | None, after: str | None) -> list[str]:
    """Check the request against the run; the tasks to measure, in order."""
    names = [t.name for t in config.tasks]
    trained = trained_tasks(run_dir)
    for label, value in (("--task", task), ("--after", after)):
        if value is not None and value not in names:
            raise UserError(f"{label} {value!r}: unknown task; the run's tasks are {names}")
        if value is not None and value not in trained:
            raise UserError(f"{label} {value!r}: task not trained yet in {run_dir} (trained: {trained or 'none'})")
    if not trained:
        raise UserError(f"{run_dir}: no task has been trained yet")
    if task is not None and after is not None and names.index(after) < names.index(task):
        raise UserError(f"--after {after!r} comes before --task {task!r} in the sequence {names}; "
                        "--after must be the task itself or a later one")
    if task is not None:
        return [task]
    limit = names.index(after) if after is not None else len(names)
    return [t for t in trained if names.index(t) <= limit]


class _BaseCache:
    """The base model loaded once; every stack is built on a deep copy of it."""

    def __init__(self, config: RunConfig):
        self.config = config
        self._base = None

    def stack(self, run_dir: Path, after: str):
        import copy

        from cl_flat.adapters import SEQLORA_ADAPTER, AdapterStack
        from cl_flat.models import load_model

        config = self.config
        if self._base is None:
            self._base = load_model(config.model.name_or_path, config.model.dtype, config.run.seed)
            if config.deepspeed.bf16:
                self._base[0].to(torch.bfloat16)
        base, tokenizer = self._base
        names = [t.name for t in config.tasks]
        if config.lora.strategy == "seqlora":
            dirs = [(SEQLORA_ADAPTER, Path(run_dir) / "adapters" / after)]
        else:
            dirs = [(n, Path(run_dir) / "adapters" / n) for n in names[:names.index(after) + 1]]
        missing = [str(d) for _, d in dirs if not d.is_dir()]
        if missing:
            raise UserError(f"{run_dir}: adapter folder(s) missing: {missing}")
        return AdapterStack.load(copy.deepcopy(base), config.lora, dirs).model, tokenizer


def compute_landscape(run_dir: Path, task: str, dims: int = 1, points: int = 21, space: str = "adapter",
                      split: str = "test", after: str | None = None, seed: int | None = None, *,
                      sharpness: bool = True, rho: float | None = None, samples: int | None = None,
                      ascent_steps: int | None = None, max_samples: int | None = None, progress: bool = True,
                      _cache: _BaseCache | None = None) -> dict[str, Any]:
    """Loss landscape of `task` with the run's adapter stack as it was right after `after`
    (default: `task` itself) was trained; writes the csv, the PNG and (with `sharpness`) the
    sharpness entry. Directions are keyed by (seed, task, space) — the same draws for every
    `after` — with seed defaulting to the run seed. Returns {"csv", "png", "sharpness_json"
    (paths; the last None without sharpness), "stem", "loss" (unperturbed), "sharpness"
    (record or None), "seconds"}."""
    import time

    from cl_flat import plots
    from cl_flat.adapters import SEQLORA_ADAPTER
    from cl_flat.data import load_task
    from cl_flat.run import load_run_config

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    config = _cache.config if _cache is not None else load_run_config(run_dir)
    if dims not in (1, 2):
        raise UserError(f"--dims: expected 1 or 2, got {dims}")
    if points < 2:
        raise UserError(f"--points: expected at least 2, got {points}")
    if space not in SPACES:
        raise UserError(f"--space: expected one of {list(SPACES)}, got {space!r}")
    if split not in SPLITS:
        raise UserError(f"--split: expected one of {list(SPLITS)}, got {split!r}")
    after = after or task
    resolve_tasks(run_dir, config, task, after)
    section = config.evaluation
    rho = section.sharpness_rho if rho is None else rho
    samples = section.sharpness_samples if samples is None else samples
    ascent_steps = section.sharpness_ascent_steps if ascent_steps is None else ascent_steps
    if rho <= 0 or samples < 1 or ascent_steps < 0:
        raise UserError("--rho must be > 0, --samples >= 1 (ascent steps >= 0)")
    seed = config.run.seed if seed is None else seed

    cache = _cache or _BaseCache(config)
    model, tokenizer = cache.stack(run_dir, after)
    task_data = load_task(next(t for t in config.tasks if t.name == task), config)
    adapter = SEQLORA_ADAPTER if config.lora.strategy == "seqlora" else task
    from cl_flat import engine as ds

    device = ds.device()
    model.to(device)
    moved = moved_weights(model, space, adapter)
    batches = held_out_batches(task_data, tokenizer, config, split, max_samples, device, rank=0, world=1)
    evaluator = PerturbedLoss(model, batches, moved)
    norms = {m.name: m.norms for m in moved}
    shapes = {m.name: m.shape for m in moved}

    grid = [-1.0 + 2.0 * i / (points - 1) for i in range(points)]
    generator = _generator(device, seed, "landscape", task, space)
    directions = [random_direction(norms, shapes, generator)]
    if dims == 2:
        directions.append(orthogonalize(random_direction(norms, shapes, generator), directions[0], norms))
    coords = [(a,) for a in grid] if dims == 1 else [(a, b) for a in grid for b in grid]
    origin = sum(all(c == 0.0 for c in cs) for cs in coords)
    forwards, backwards = sharpness_passes(samples, ascent_steps, base=False) if sharpness else (0, 0)
    total = 1 + len(coords) - origin + forwards + backwards
    stem = landscape_stem(task, after, space)
    with _progress(progress, f"landscape {stem}", total) as advance:
        # L(θ) once: the grid's origin and the sharpness baseline reuse it
        base = evaluator(None)
        advance()
        losses = loss_surface(lambda eps: base if eps is None else evaluator(eps), directions, coords, advance)
        record = None
        if sharpness:
            gen = _generator(device, seed, "sharpness", task, space)
            est = _sharpness(evaluator, moved, rho, samples, ascent_steps, gen, advance, base=base)
            record = _sharpness_record(est, rho, samples, ascent_steps, space, split,
                                       sum(len(b["input_ids"]) for b in batches), evaluator.tokens,
                                       after if after != task else None)
    suffix = f"{dims}d"
    csv_path = run_dir / "landscape" / f"{stem}_{suffix}.csv"
    header = ("alpha", "loss") if dims == 1 else ("alpha", "beta", "loss")
    _write_csv(csv_path, header, [(*c, v) for c, v in zip(coords, losses)])
    png_path = run_dir / "plots" / f"landscape_{stem}_{suffix}.png"
    (plots.plot_landscape_1d if dims == 1 else plots.plot_landscape_2d)(csv_path, png_path)
    json_path = merge_sharpness(run_dir, stem, record) if record is not None else None
    passes = {"forward": evaluator.evaluations - evaluator.gradients, "forward_backward": evaluator.gradients}
    del model
    return {"csv": csv_path, "png": png_path, "sharpness_json": json_path, "stem": stem, "loss": base,
            "grid": losses, "sharpness": record, "passes": passes,
            "examples": sum(len(b["input_ids"]) for b in batches), "seconds": time.perf_counter() - started}

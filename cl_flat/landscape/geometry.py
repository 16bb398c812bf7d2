"""The pure geometry of loss landscapes and sharpness: vectors are dicts of tensors (one per moved
weight, rows = output channels); no model, no files.

**Directions** (Li et al. 2018). z ~ N(0, I) from a dedicated `torch.Generator` (never the
global RNG), tensors visited in sorted name order; then filter normalisation per output row
d_i = z_i / ‖z_i‖ · ‖W_i‖. So each row of d is uniform on the sphere of radius ‖W_i‖
(independently per row), and ‖d‖₂ = ‖W‖_F exactly. 1-D tensors (biases, norms) get 0.
2-D: the second direction is Gram-Schmidt orthogonalised to the first ROW BY ROW
(d2_i ← d2_i − ⟨d2_i, d1_i⟩/‖d1_i‖² · d1_i), then re-filter-normalised. Row-wise orthogonality
implies ⟨d1, d2⟩ = 0 over the whole vector, and rescaling rows keeps it, so d2 is exactly
orthogonal to d1 AND exactly filter-normalised (whole-vector Gram-Schmidt followed by
re-normalisation would only be approximately orthogonal). A row of length 1 cannot be
orthogonalised and stays 0 in d2. The loss at grid point (α, β) is L(θ + α d1 + β d2).
Filter normalisation is implemented rather than a Gaussian direction of std σ|W| (the form some
write-ups of the method use): each row has exactly the norm ‖W_i‖, so α is a relative step size that
means the same for every layer and every run.

**Sharpness** — filter-wise (adaptive) geometry, the same as the directions'. ρ is RELATIVE
and PER ROW: row i of every moved tensor may move by at most r_i = ρ‖W_i‖, i.e. the ball is
U = {ε : ‖ε_i‖ ≤ ρ‖W_i‖ for every row i} = {ε : ‖T_W⁻¹ ε‖_{2,∞} ≤ ρ}, T_W = diag(‖W_i‖) per row:
the filter-normalised ("adaptive") sharpness of Kwon et al. 2021 (ASAM, filter-wise T_W) and
Andriushchenko et al. 2023 (adaptive sharpness), here with an L2 norm per row. It is invariant
to LoRA's rescaling symmetry A → cA, B → B/c, and a small row (e.g. a LoRA B that is small after
training) only moves by ρ times its OWN norm — in a plain L2 ball of radius ρ‖W‖_F the large rows
(A) set the radius and the ascent could push B by many times its norm. U lies inside that L2 ball
(‖ε‖² = Σ‖ε_i‖² ≤ (ρ‖W‖_F)²), so worst-case values here are ≤ the plain-L2 ones. The estimate's
`radius` is ρ‖W‖_F = the norm of every random sample (the largest ‖ε‖ in U).
Average case: M directions d_m as above, ε_m = ρ·d_m (every row on its sphere ‖ε_i‖ = r_i, on the
boundary of U; alpha = ρ on a 1-D landscape is one sample); avg = (1/M) Σ_m L(θ+ε_m) − L(θ). On a
quadratic L = ½ wᵀHw around W (w = vec W), E[avg] = ρ²/(2n) Σ_i ‖W_i‖² tr(H_ii) (n = row length,
H_ii the block of row i); for one row this is r²·tr(H)/(2n).
Worst case (its ε is kept as `worst_perturbation`): the larger of max_m L(θ+ε_m) and the best
iterate of a projected, per-row normalised gradient ascent in U, started at the best random ε, K
steps ε_i ← Π_i(ε_i + η·ρ‖W_i‖·g_i/‖g_i‖)
(η = 1; Π_i rescales a row that left its ball back onto its sphere — the exact projection onto
U), minus L(θ); so worst ≥ max over the random samples by construction. On L = ½ wᵀHw at w = 0
with H block-diagonal over rows (separable), max_U = Σ_i ½ r_i² λ_max(H_ii); with one row (U = the
L2 ball of radius r) it is r²·λ_max/2, and the ascent approaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cl_flat.lora_layers import row_norms

Params = dict[str, torch.Tensor]


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """⟨a, b⟩ over every tensor, in float64."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def l2_norm(a: Mapping[str, torch.Tensor]) -> float:
    """‖a‖₂ over every tensor."""
    return math.sqrt(dot(a, a))


def combine(terms: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> Params:
    """Σ_k c_k v_k."""
    keys = terms[0][1].keys()
    return {k: sum(c * v[k] for c, v in terms) for k in keys}


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reference_norms(weight: torch.Tensor) -> torch.Tensor | None:
    """‖W_i‖ per output row, the radii directions are normalised to; None (never moves) below 2 dims."""
    return None if weight.dim() < 2 else row_norms(weight)


def _rescale_rows(direction: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    if norms is None:
        return torch.zeros_like(direction)
    rows = direction.flatten(1)
    current = rows.norm(dim=1, keepdim=True)
    scale = torch.where(current > 0, norms.to(rows).unsqueeze(1) / current.clamp_min(1e-30), torch.zeros_like(current))
    return (rows * scale).view_as(direction)


def filter_rows(direction: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """d_i ← d_i/‖d_i‖·norms_i for every row i (rows with d_i = 0, and norms None, give 0)."""
    return _rescale_rows(_at_least_fp32(direction), norms)


def filter_normalize(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d_i ← d_i/‖d_i‖·‖W_i‖ for every output row i (dim 0); 0 for 1-D tensors (biases,
    norm weights) and for rows where d_i = 0."""
    if direction.shape != weight.shape:
        raise ValueError(f"direction shape {tuple(direction.shape)} != weight shape {tuple(weight.shape)}")
    return filter_rows(direction, reference_norms(weight))


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
    (every c_k == 0) is asked as loss(None), so a closure that already knows L(θ) answers it
    without a pass; `advance` is called once per loss(ε) with ε
    not None."""
    values = []
    for c in coords:
        if len(c) != len(directions):
            raise ValueError(f"coordinate {tuple(c)} has {len(c)} entries for {len(directions)} directions")
        if all(float(ck) == 0.0 for ck in c):
            values.append(float(loss(None)))
            continue
        values.append(float(loss(combine([(float(ck), d) for ck, d in zip(c, directions)]))))
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
    worst_perturbation: Params | None = field(default=None, compare=False, repr=False)  # the ε of `worst`


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


def _random_samples(loss: Callable[[Params | None], float], sample_direction: Callable[[], Params],
                    radii: Mapping[str, torch.Tensor | None], samples: int,
                    tick: Callable[[], None]) -> tuple[list[float], Params | None, float]:
    """(the loss at each random ε on the boundary of the ball, the worst of those ε, its loss)."""
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
    return randoms, best, best_loss


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
    randoms, best, best_loss = _random_samples(loss, sample_direction, radii, samples, tick)
    worst_eps, worst_loss = best, best_loss
    ascent: list[float] = []
    size = radius_norm(radii)
    if ascent_steps > 0 and loss_and_grad is not None and size > 0:
        eps = best
        for _ in range(ascent_steps):
            value, grad = loss_and_grad(eps)
            ascent.append(float(value))
            if value > worst_loss:
                worst_eps, worst_loss = eps, float(value)
            tick()
            g = l2_norm(grad)
            if not math.isfinite(g) or g == 0.0:
                break
            step = {k: _rescale_rows(v, radii[k]) for k, v in grad.items()}  # row i: r_i g_i/‖g_i‖
            eps = project_rows(combine([(1.0, eps), (step_size, step)]), radii)
        else:
            ascent.append(float(loss(eps)))
            if ascent[-1] > worst_loss:
                worst_eps, worst_loss = eps, ascent[-1]
            tick()
    worst = max(randoms + ascent)
    return SharpnessEstimate(avg=sum(randoms) / len(randoms) - base, worst=worst - base, base=base, radius=size,
                             random=tuple(v - base for v in randoms), ascent=tuple(v - base for v in ascent),
                             worst_perturbation=worst_eps)


def sharpness_passes(samples: int, ascent_steps: int, base: bool = True) -> tuple[int, int]:
    """(forward-only passes, forward+backward passes) of `estimate_sharpness` when the ascent
    runs all its steps (`base`: whether L(θ) is computed there rather than handed in)."""
    return int(base) + samples + (1 if ascent_steps > 0 else 0), ascent_steps

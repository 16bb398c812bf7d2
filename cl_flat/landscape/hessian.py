"""The Hessian's top eigenvalue and trace from Hessian-vector products (pure: no model, no files).

Vectors are dicts of tensors (one per moved weight), as in `geometry`; the Hessian H = ∇²L(θ) is only
ever touched through a closure `hvp(v) -> Hv`. The model side (`PerturbedLoss.hvp`) computes Hv
exactly by double backward, Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact multiplication by
the Hessian"): Hv = ∇_θ ⟨∇_θ L(θ), v⟩, one forward and two backward passes, no H is formed.

**Top eigenvalue** (`power_iteration` as in PyHessian, Yao et al. 2020): v₀ ~ N(0, I) from a keyed
generator, v₀ ← v₀/‖v₀‖; then for k = 1..K: w = Hv_{k−1}, λ_k = ⟨v_{k−1}, w⟩ (the Rayleigh quotient),
v_k = w/‖w‖; stop after K = `iters` products or once |λ_k − λ_{k−1}| ≤ tol·(|λ_{k−1}| + 1e−12).
It converges to the eigenvalue of largest MAGNITUDE λ_dom (geometrically, at rate |λ₂/λ₁|); at a
minimum H ⪰ 0 and that is λ_max. Away from a minimum (a few updates into a task, a saddle) H is
indefinite and λ_dom can be negative; `top_eigenvalue` then finds the LARGEST eigenvalue by the Lanczos
method (Lanczos 1950; Golub & Van Loan §10.1): from a fresh unit v₁, β₀ = 0, for k = 1..K:
w = Hv_k − β_{k−1}v_{k−1}, α_k = ⟨w, v_k⟩, w ← w − α_k v_k, β_k = ‖w‖, v_{k+1} = w/β_k. The largest
eigenvalue θ of the tridiagonal T_k = tridiag(β, α, β) (a Ritz value) is ≤ λ_max and converges to it
from below, much faster than power iteration on a shifted H (Kaniel-Paige); with y its unit eigenvector
of T_k, H has an eigenvalue within β_k·|y_k| of θ, and the run stops once β_k·|y_k| ≤ tol·(|θ| + 1e−12)
(or β_k = 0: an invariant subspace, θ exact). No reorthogonalisation, three vectors kept: lost
orthogonality only duplicates converged Ritz values (Paige 1976), the largest one stays valid.

**Trace** (`hutchinson_trace`, Hutchinson 1989): tr(H) = E[zᵀHz] for any z with E[zzᵀ] = I; with
Rademacher z (entries ±1, probability ½ each) the estimate (1/m) Σ_j z_jᵀHz_j has the smallest
variance, Var(zᵀHz) = 2 Σ_{i≠j} H_ij², so it is EXACT for a diagonal H. Reported with its standard
error s/√m (s the sample standard deviation over the m probes; None for m = 1).

Every draw comes from the generator handed in (never the global RNG), tensors visited in sorted
name order, so a seed fixes every vector on a given device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from cl_flat.landscape.geometry import Params, dot, l2_norm

HVP = Callable[[Params], Params]


@dataclass(frozen=True)
class TopEigenvalue:
    value: float                 # λ_K, the last Rayleigh quotient (power iteration) or top Ritz value (Lanczos)
    iterations: int              # Hessian-vector products spent (K; top_eigenvalue: both runs')
    converged: bool              # the stopping test was met before the cap (top_eigenvalue: the last run's)
    history: tuple[float, ...]   # λ_1..λ_K
    dominant: float | None = None  # top_eigenvalue: the eigenvalue of largest magnitude (first run)


@dataclass(frozen=True)
class TraceEstimate:
    value: float                 # (1/m) Σ_j z_jᵀHz_j
    se: float | None             # s/√m (None for m = 1)
    probes: int                  # m
    samples: tuple[float, ...]   # z_jᵀHz_j


def rademacher(shapes: Mapping[str, torch.Size], generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> Params:
    """z with independent entries ±1 (probability ½ each) from `generator`, tensors in sorted name order."""
    return {name: torch.randint(0, 2, tuple(shapes[name]), generator=generator, device=generator.device)
            .to(dtype).mul_(2).sub_(1) for name in sorted(shapes)}


def gaussian(shapes: Mapping[str, torch.Size], generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> Params:
    """z ~ N(0, I) from `generator`, tensors in sorted name order."""
    return {name: torch.randn(tuple(shapes[name]), generator=generator, dtype=dtype, device=generator.device)
            for name in sorted(shapes)}


def _scaled(v: Mapping[str, torch.Tensor], c: float) -> Params:
    return {k: t * c for k, t in v.items()}


def power_iteration(hvp: HVP, shapes: Mapping[str, torch.Size], generator: torch.Generator, *, iters: int,
                    tol: float, dtype: torch.dtype = torch.float32) -> TopEigenvalue:
    """The eigenvalue of H of largest magnitude by power iteration (module docstring): at most `iters`
    Hessian-vector products, stopping early once |λ_k − λ_{k−1}| ≤ tol·(|λ_{k−1}| + 1e−12)."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    v = _unit_start(shapes, generator, dtype)
    history: list[float] = []
    converged = False
    for _ in range(iters):
        w = hvp(v)
        value = dot(v, w)
        history.append(value)
        if len(history) > 1 and abs(value - history[-2]) <= tol * (abs(history[-2]) + 1e-12):
            converged = True
            break
        size = l2_norm(w)
        if size == 0.0 or not math.isfinite(size):  # Hv = 0: v is in the null space, λ = 0 along it
            converged = size == 0.0
            break
        v = _scaled(w, 1.0 / size)
    return TopEigenvalue(history[-1], len(history), converged, tuple(history))


def _unit_start(shapes: Mapping[str, torch.Size], generator: torch.Generator, dtype: torch.dtype) -> Params:
    v = gaussian(shapes, generator, dtype)
    norm = l2_norm(v)
    if norm == 0.0:
        raise ValueError("no parameters to take the Hessian of")
    return _scaled(v, 1.0 / norm)


def lanczos_largest(hvp: HVP, shapes: Mapping[str, torch.Size], generator: torch.Generator, *, iters: int,
                    tol: float, dtype: torch.dtype = torch.float32) -> TopEigenvalue:
    """The largest eigenvalue of H by the Lanczos method (module docstring): at most `iters` Hessian-vector
    products, stopping once the top Ritz value's residual bound β_k·|y_k| ≤ tol·(|θ| + 1e−12)."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    v, previous = _unit_start(shapes, generator, dtype), None
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    converged = False
    for _ in range(iters):
        w = hvp(v)
        if previous is not None:
            w = {k: t - betas[-1] * previous[k] for k, t in w.items()}
        alphas.append(dot(w, v))
        w = {k: t - alphas[-1] * v[k] for k, t in w.items()}
        beta = l2_norm(w)
        ritz, vectors = torch.linalg.eigh(torch.diag(torch.tensor(alphas, dtype=torch.float64))
                                          + torch.diag(torch.tensor(betas, dtype=torch.float64), 1)
                                          + torch.diag(torch.tensor(betas, dtype=torch.float64), -1))
        theta = float(ritz[-1])
        history.append(theta)
        if beta * abs(float(vectors[-1, -1])) <= tol * (abs(theta) + 1e-12) or not math.isfinite(beta):
            converged = math.isfinite(beta)
            break
        betas.append(beta)
        previous, v = v, _scaled(w, 1.0 / beta)
    return TopEigenvalue(history[-1], len(history), converged, tuple(history))


def top_eigenvalue(hvp: HVP, shapes: Mapping[str, torch.Size], generator: torch.Generator, *, iters: int,
                   tol: float, dtype: torch.dtype = torch.float32) -> TopEigenvalue:
    """λ_max, the LARGEST eigenvalue of H (module docstring): power iteration gives the dominant one
    λ_dom, which is λ_max when ≥ 0; when λ_dom < 0, Lanczos (its own `iters` cap, a fresh start vector from
    `generator`) gives λ_max. `dominant` keeps λ_dom; iterations count the products of both."""
    first = power_iteration(hvp, shapes, generator, iters=iters, tol=tol, dtype=dtype)
    if first.value >= 0:
        return replace(first, dominant=first.value)
    second = lanczos_largest(hvp, shapes, generator, iters=iters, tol=tol, dtype=dtype)
    return TopEigenvalue(second.value, first.iterations + second.iterations, second.converged,
                         first.history + second.history, dominant=first.value)


def hutchinson_trace(hvp: HVP, shapes: Mapping[str, torch.Size], generator: torch.Generator, *, probes: int,
                     dtype: torch.dtype = torch.float32) -> TraceEstimate:
    """tr(H) ≈ (1/m) Σ_j z_jᵀHz_j over m = `probes` Rademacher vectors, with its standard error
    s/√m (module docstring)."""
    if probes < 1:
        raise ValueError("probes must be >= 1")
    samples = []
    for _ in range(probes):
        z = rademacher(shapes, generator, dtype)
        samples.append(dot(z, hvp(z)))
    mean = sum(samples) / probes
    se = None
    if probes > 1:
        se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (probes - 1) / probes)
    return TraceEstimate(mean, se, probes, tuple(samples))

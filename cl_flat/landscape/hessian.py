"""The Hessian's top eigenvalue and trace from Hessian-vector products (pure: no model, no files).

Vectors are dicts of tensors (one per moved weight), as in `geometry`; the Hessian H = ∇²L(θ) is only
ever touched through a closure `hvp(v) -> Hv`. The model side (`PerturbedLoss.hvp`) computes Hv
exactly by double backward, Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact multiplication by
the Hessian"): Hv = ∇_θ ⟨∇_θ L(θ), v⟩, one forward and two backward passes, no H is formed.

**Top eigenvalue** (`power_iteration`, as in PyHessian, Yao et al. 2020): v₀ ~ N(0, I) from a keyed
generator, v₀ ← v₀/‖v₀‖; then for k = 1..K: w = Hv_{k−1}, λ_k = ⟨v_{k−1}, w⟩ (the Rayleigh quotient),
v_k = w/‖w‖; stop after K = `iters` products or once |λ_k − λ_{k−1}| ≤ tol·(|λ_{k−1}| + 1e−12).
It converges to the eigenvalue of largest MAGNITUDE (geometrically, at rate |λ₂/λ₁|); at a minimum
H ⪰ 0 and that is λ_max. Near a saddle a negative value can come back; it is reported as is.

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
from dataclasses import dataclass

import torch

from cl_flat.landscape.geometry import Params, dot, l2_norm

HVP = Callable[[Params], Params]


@dataclass(frozen=True)
class TopEigenvalue:
    value: float                 # λ_K, the last Rayleigh quotient
    iterations: int              # Hessian-vector products spent (K)
    converged: bool              # the relative change fell below tol before the cap
    history: tuple[float, ...]   # λ_1..λ_K


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
    v = gaussian(shapes, generator, dtype)
    norm = l2_norm(v)
    if norm == 0.0:
        raise ValueError("no parameters to take the Hessian of")
    v = _scaled(v, 1.0 / norm)
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

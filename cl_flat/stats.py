"""Summary statistics over a few runs (pure functions, standard library only).

For values x_1..x_n (one per run, or one paired difference per seed):
    mean          x̄ = (1/n) Σ x_k
    sample std    s = sqrt( Σ (x_k − x̄)² / (n − 1) )              (undefined for n = 1)
    95% CI        x̄ ± h,  h = t_{0.975, n−1} · s / √n              (Student t, n − 1 degrees of freedom)
The Student-t quantile is computed here (no scipy): the t CDF is written with the regularised
incomplete beta function I_x(a, b) and inverted by bisection. Undefined values are NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "mean", "sample_std", "t_quantile", "t_cdf", "ci_half_width", "summarize", "summarize_defined"]

CONFIDENCE = 0.95


def mean(values: Sequence[float]) -> float:
    """x̄ = (1/n) Σ x_k; NaN for no values."""
    return math.fsum(values) / len(values) if values else math.nan


def sample_std(values: Sequence[float]) -> float:
    """s = sqrt(Σ (x_k − x̄)² / (n − 1)); NaN for n < 2 (one run says nothing about spread)."""
    n = len(values)
    if n < 2:
        return math.nan
    centre = mean(values)
    return math.sqrt(math.fsum((x - centre) ** 2 for x in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; converges for x < (a + 1)/(a + b + 2))."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return fraction


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: int) -> float:
    """P(T ≤ t) for Student's t with ν = dof: 1 − ½·I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0, symmetric below 0."""
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: int) -> float:
    """t_{p, ν}: the t with P(T ≤ t) = p (0 < p < 1, ν ≥ 1), by bisection on t_cdf to machine precision.
    E.g. t_{0.975, 2} = 4.302653, t_{0.975, 1} = 12.706205."""
    if not 0.0 < p < 1.0 or dof < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, dof) < p else (low, middle)
    return 0.5 * (low + high)


def ci_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """h = t_{(1+c)/2, n−1} · s / √n, the half-width of the two-sided t interval; NaN for n < 2."""
    n = len(values)
    if n < 2:
        return math.nan
    return t_quantile((1.0 + confidence) / 2.0, n - 1) * sample_std(values) / math.sqrt(n)


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample std and the 95% t interval mean ± half_width (std, half_width NaN if n = 1)."""

    n: int
    mean: float
    std: float
    half_width: float

    @property
    def ci_low(self) -> float:
        return self.mean - self.half_width

    @property
    def ci_high(self) -> float:
        return self.mean + self.half_width


def summarize(values: Sequence[float]) -> Summary:
    """Summary of at least one value."""
    if not values:
        raise ValueError("summarize needs at least one value")
    return Summary(len(values), mean(values), sample_std(values), ci_half_width(values))


def summarize_defined(values: Sequence[float | None]) -> Summary | None:
    """Summary of the values, or None if there is none or any is undefined (None): a missing value is never
    averaged away."""
    if not values or any(v is None for v in values):
        return None
    return summarize([float(v) for v in values])

"""Summary statistics over a few runs (pure functions, standard library only).

For values x_1..x_n (one per run, or one paired difference per seed):
    mean          x̄ = (1/n) Σ x_k
    sample std    s = sqrt( Σ (x_k − x̄)² / (n − 1) )              (undefined for n = 1)
    95% CI        x̄ ± h,  h = t_{0.975, n−1} · s / √n              (Student t, n − 1 degrees of freedom)
The Student-t quantile is computed here (no scipy): the t CDF is written with the regularised
incomplete beta function I_x(a, b) and inverted by bisection. Undefined values are NaN, never 0.

Tests of "mean 0" over a family of differences (report.md tests every paired difference of every group):
    p            = 2·(1 − F_{n−1}(|x̄|·√n / s)), the two-sided one-sample t test (p < 0.05 ⟺ the 95% CI
                   excludes 0)
    Holm p̃_(k)   = min(1, max_{j≤k} (m − j + 1)·p_(j)) for the sorted p_(1) ≤ … ≤ p_(m) of the family: p̃ < α
                   keeps the chance of any false "differs" in the family at most α (Holm 1979, Scand. J. Stat.)
    detectable   δ_80 = (t_{0.975, n−1} + t_{0.80, n−1}) · s / √n, the mean difference that test would find
                   with about 80% power given the spread s seen (the usual t approximation of the
                   noncentral-t power; e.g. Cohen 1988, ch. 2): what a null result could have excluded

Rank correlation of pairs (x_k, y_k) and its interval when the pairs come in dependent clusters (runs of one
seed share its data sample and initialisation): `spearman` and `cluster_bootstrap_ci`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["Summary", "mean", "sample_std", "t_quantile", "t_cdf", "ci_half_width", "summarize", "summarize_defined",
           "t_test_p", "holm", "detectable_difference",
           "average_ranks", "spearman", "BootstrapInterval", "cluster_bootstrap_ci"]

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


def t_test_p(summary: Summary) -> float:
    """Two-sided p of the one-sample t test of mean 0 (module docstring); NaN for n < 2; with s = 0, 0 for a
    non-zero mean and 1 for a zero one."""
    if summary.n < 2 or math.isnan(summary.std):
        return math.nan
    if summary.std == 0:
        return 1.0 if summary.mean == 0 else 0.0
    return 2.0 * (1.0 - t_cdf(abs(summary.mean) * math.sqrt(summary.n) / summary.std, summary.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p of each value, in the given order (module docstring); a NaN is not part of
    the family and stays NaN."""
    family = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(family):
        running = max(running, min(1.0, (len(family) - rank) * p))
        adjusted[i] = running
    return adjusted


def detectable_difference(summary: Summary, power: float = 0.8) -> float:
    """δ = (t_{0.975, n−1} + t_{power, n−1})·s/√n (module docstring); NaN for n < 2."""
    if summary.n < 2 or math.isnan(summary.std):
        return math.nan
    dof = summary.n - 1
    return (t_quantile((1.0 + CONFIDENCE) / 2.0, dof) + t_quantile(power, dof)) * summary.std / math.sqrt(summary.n)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values`, tied values sharing the mean of the ranks they span ([5, 1, 5] -> [2.5, 1, 2.5])."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in order[start:end + 1]:
            ranks[k] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation ρ = Pearson correlation of the average ranks of x and of y (Spearman 1904):
        ρ = Σ (r_k − r̄)(q_k − q̄) / sqrt(Σ (r_k − r̄)² · Σ (q_k − q̄)²),  r = ranks(x), q = ranks(y);
    without ties this is 1 − 6 Σ (r_k − q_k)² / (n (n² − 1)). NaN for n < 2 or when x or y is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs as many x as y values, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    r, q = average_ranks(x), average_ranks(y)
    r_bar, q_bar = mean(r), mean(q)
    sxy = math.fsum((a - r_bar) * (b - q_bar) for a, b in zip(r, q))
    sxx, syy = math.fsum((a - r_bar) ** 2 for a in r), math.fsum((b - q_bar) ** 2 for b in q)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic of all the points, and the percentile interval [low, high] of its cluster bootstrap."""

    estimate: float
    low: float                 # NaN with fewer than 2 clusters, or no resample where it is defined
    high: float
    clusters: int              # distinct clusters among the points
    resamples: int             # bootstrap resamples where the statistic was defined (of those drawn)


def cluster_bootstrap_ci(x: Sequence[float], y: Sequence[float], clusters: Sequence[Hashable],
                         statistic=spearman, resamples: int = 2000, confidence: float = CONFIDENCE,
                         seed: int = 0) -> BootstrapInterval:
    """Cluster (block) bootstrap of statistic(x, y) (Davison & Hinkley 1997, §3.8): with C distinct clusters, a
    resample draws C clusters uniformly with replacement and takes all the points of each draw (a cluster drawn
    twice contributes its points twice); the interval is the (1 − c)/2 and (1 + c)/2 percentiles (linear
    interpolation between order statistics) of the statistic over the resamples where it is defined. Points
    of one cluster are resampled together because they are not independent. Deterministic for a `seed`."""
    if not len(x) == len(y) == len(clusters):
        raise ValueError("cluster_bootstrap_ci needs one x, one y and one cluster per point")
    members: dict[Hashable, list[int]] = {}
    for k, cluster in enumerate(clusters):
        members.setdefault(cluster, []).append(k)
    keys = list(members)
    estimate = statistic(list(x), list(y))
    if len(keys) < 2:
        return BootstrapInterval(estimate, math.nan, math.nan, len(keys), 0)
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picked = [k for _ in keys for k in members[keys[rng.randrange(len(keys))]]]
        value = statistic([x[k] for k in picked], [y[k] for k in picked])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return BootstrapInterval(estimate, math.nan, math.nan, len(keys), 0)
    values.sort()

    def percentile(p: float) -> float:
        position = p * (len(values) - 1)
        below = math.floor(position)
        above = min(below + 1, len(values) - 1)
        return values[below] + (position - below) * (values[above] - values[below])

    return BootstrapInterval(estimate, percentile((1 - confidence) / 2), percentile((1 + confidence) / 2),
                             len(keys), len(values))

"""Numbers across seeds and between methods: mean ± std, a 95% interval, a paired test, Pareto fronts.

Pure functions of recorded results (no torch), so the report can recompute them any time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (standard tables, e.g.
# NIST/SEMATECH e-Handbook 1.3.6.7.2); above 30 degrees of freedom the normal 1.96 is within 4%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
BOOTSTRAP_RESAMPLES = 2000


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class Summary:
    """n values: mean, sample standard deviation and the t-based 95% interval of the mean."""

    n: int
    mean: float
    std: float | None  # None for a single value
    low: float | None
    high: float | None


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize needs at least one value")
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return Summary(1, mean, None, None, None)
    std = float(arr.std(ddof=1))
    half = t975(len(arr) - 1) * std / math.sqrt(len(arr))
    return Summary(len(arr), mean, std, mean - half, mean + half)


def binomial_interval(accuracy: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of an accuracy (a fraction) measured on ``n`` examples: the sampling
    uncertainty of the evaluation set itself, which one seed cannot average away."""
    if n <= 0:
        raise ValueError("binomial_interval needs at least one example")
    z = 1.959964
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@dataclass
class Comparison:
    """Method A minus method B on the same test rows and seeds.

    ``diff`` is the difference of seed-averaged test accuracies; (``low``, ``high``) its 95% paired
    bootstrap interval over test examples; ``seeds_agree`` is True when A - B has the same sign
    for every seed. The difference is ``marked`` only when the interval excludes zero *and* the
    seeds agree over at least two seeds: the first guards against test-set sampling noise, the
    second against seed noise (which one seed cannot show).
    """

    diff: float
    low: float
    high: float
    seeds_agree: bool
    n_seeds: int = 1

    @property
    def marked(self) -> bool:
        return self.n_seeds >= 2 and self.seeds_agree and (self.low > 0 or self.high < 0)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, 2.5th, 97.5th percentile) of mean(correct_a) - mean(correct_b).

    ``correct_*`` are (seeds, examples) arrays of 0/1 (or per-example accuracies); examples are
    resampled with replacement, the same examples for both methods (paired), after averaging
    each example over seeds.
    """
    a = np.asarray(correct_a, dtype=float).reshape(-1, np.shape(correct_a)[-1]).mean(0)
    b = np.asarray(correct_b, dtype=float).reshape(-1, np.shape(correct_b)[-1]).mean(0)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_bootstrap needs predictions on the same, non-empty set of test rows")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(500, resamples - i), d.size))].mean(1)
                            for i in range(0, resamples, 500)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


def compare(correct_a: dict[int, np.ndarray], correct_b: dict[int, np.ndarray]) -> Comparison | None:
    """A vs B over the seeds both have (seed -> 0/1 per test example); None without shared seeds."""
    seeds = sorted(set(correct_a) & set(correct_b))
    if not seeds:
        return None
    a = np.stack([np.asarray(correct_a[s], dtype=float) for s in seeds])
    b = np.stack([np.asarray(correct_b[s], dtype=float) for s in seeds])
    if a.shape != b.shape:
        return None
    diff, low, high = paired_bootstrap(a, b)
    per_seed = a.mean(1) - b.mean(1)
    agree = bool((per_seed > 0).all() or (per_seed < 0).all())
    return Comparison(diff, low, high, agree, len(seeds))


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """For each point, whether no other point is at most as costly and at least as good, one strictly."""
    out = []
    for i, (c, s) in enumerate(zip(costs, scores)):
        dominated = any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(zip(costs, scores)) if j != i)
        out.append(not dominated)
    return out

"""Across-seed statistics, the paired comparison and Pareto fronts against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftlab.lab import stats


def test_summary_of_three_seeds():
    s = stats.summarize([81.65, 79.13, 81.77])  # the LoRA seeds quoted in issue 18
    mean = (81.65 + 79.13 + 81.77) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in (81.65, 79.13, 81.77)) / 2)
    half = 4.303 * std / math.sqrt(3)  # t_{0.975, 2} = 4.303
    assert s.n == 3 and s.mean == pytest.approx(mean, abs=1e-12) and s.std == pytest.approx(std, rel=1e-12)
    assert (s.low, s.high) == (pytest.approx(mean - half, rel=1e-12), pytest.approx(mean + half, rel=1e-12))
    one = stats.summarize([80.0])
    assert (one.n, one.mean, one.std, one.low) == (1, 80.0, None, None)
    assert stats.t975(1) == 12.706 and stats.t975(30) == 2.042 and stats.t975(200) == 1.96


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = (rng.random((2, 400)) < 0.8).astype(float)
    diff, low, high = stats.paired_bootstrap(a, a)
    assert diff == 0 and low == 0 and high == 0  # identical predictions: no difference in any resample
    b = a.copy()
    b[:, :80] = 0  # B gets 80 more rows wrong wherever A was right there
    diff, low, high = stats.paired_bootstrap(a, b)
    assert diff == pytest.approx(a[:, :80].mean(1).mean() * 80 / 400, abs=1e-12)
    assert 0 < low < diff < high
    # the interval of a mean of n resampled paired differences has width ~ 2 * 1.96 * sd / sqrt(n)
    d = a.mean(0) - b.mean(0)
    expected = 2 * 1.96 * d.std() / math.sqrt(400)
    assert high - low == pytest.approx(expected, rel=0.15)  # 2000 resamples: the quantiles scatter by a few %


def test_a_difference_is_marked_only_when_the_interval_excludes_zero_and_every_seed_agrees():
    base = np.ones(300)
    worse = base.copy()
    worse[:60] = 0  # 20 points behind at each seed
    marked = stats.compare({0: base, 1: base}, {0: worse, 1: worse})
    assert marked.diff == pytest.approx(0.2) and marked.seeds_agree and marked.marked
    # Ahead by 20 points at seed 0, behind by 20 at seed 1: the seeds disagree, nothing is marked
    split = stats.compare({0: base, 1: worse}, {0: worse, 1: base})
    assert split.diff == pytest.approx(0.0) and not split.seeds_agree and not split.marked
    # Ahead at both seeds, but by one row of 300: the seeds agree, the bootstrap interval holds 0
    slight = base.copy()
    slight[0] = 0
    small = stats.compare({0: base, 1: base}, {0: slight, 1: slight})
    assert small.seeds_agree and small.low <= 0 < small.high and not small.marked
    assert stats.compare({0: base}, {1: base}) is None  # no shared seed
    one = stats.compare({0: base}, {0: worse})
    assert one.low > 0 and one.seeds_agree and not one.marked  # one seed cannot show that a difference holds across seeds


def test_pareto_front():
    # (cost, accuracy): the middle point is dominated by the first (cheaper and better)
    assert stats.pareto_front([1, 2, 3], [0.8, 0.7, 0.9]) == [True, False, True]
    assert stats.pareto_front([1, 1], [0.8, 0.8]) == [True, True]  # equal points do not dominate each other

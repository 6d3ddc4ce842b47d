"""A study's runs folded into groups: one per run of the file, over its seeds, at its chosen setting.

Reports and plots use these summaries; they are computed from results.json alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftlab.lab import stats
from peftlab.lab.results import OK, RunResult


@dataclass
class GroupSummary:
    """One method configuration over its seeds (a plain study: one run per group)."""

    name: str
    method: str
    setting: dict[str, Any]
    runs: list[RunResult]  # finished ok
    failed: list[RunResult] = field(default_factory=list)
    accuracy: stats.Summary | None = None  # in %, on the reported split
    seconds: stats.Summary | None = None  # training wall time
    tokens_per_second: float | None = None
    peak_mb: float | None = None  # CUDA peak when measured, else peak RSS
    trainable_params: int | None = None
    vs_best: stats.Comparison | None = None
    pareto_params: bool = False
    pareto_time: bool = False

    @property
    def seeds(self) -> list[int]:
        return [int((r.run.get("train") or {}).get("seed", 0)) for r in self.runs]


def peak_mb(r: RunResult) -> float | None:
    """The run's peak memory: CUDA's when it was measured, else the process's peak RSS."""
    return r.cuda_peak_mb if r.cuda_peak_mb is not None else r.peak_rss_mb


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def final_runs(runs: list[RunResult], raw: dict[str, Any]) -> dict[str, list[RunResult]]:
    """group name -> its final runs (the chosen setting, every seed); sweep-only runs are left out."""
    by_name = {r.name: r for r in runs}
    groups = raw.get("groups")
    if isinstance(groups, dict) and groups:
        return {g: [by_name[n] for n in names if n in by_name] for g, names in groups.items()}
    return {r.name: [r] for r in runs}


def correct_by_seed(group: GroupSummary) -> dict[int, np.ndarray] | None:
    """seed -> 1/0 per reported-split example, or None when a run kept no predictions."""
    out = {}
    for seed, r in zip(group.seeds, group.runs):
        if r.predictions is None or r.labels is None or len(r.predictions) != len(r.labels):
            return None
        out[seed] = (np.asarray(r.predictions) == np.asarray(r.labels)).astype(float)
    return out


def summarize(runs: list[RunResult], raw: dict[str, Any]) -> list[GroupSummary]:
    out = []
    for name, members in final_runs(runs, raw).items():
        if not members:
            continue
        ok = [r for r in members if r.status == OK and r.accuracy is not None]
        g = GroupSummary(name=name, method=members[0].method, setting=dict(members[0].run.get("setting") or {}), runs=ok,
                         failed=[r for r in members if r not in ok])
        if ok:
            g.accuracy = stats.summarize([100 * r.accuracy for r in ok])
            times = [r.train_seconds for r in ok if r.train_seconds is not None]
            g.seconds = stats.summarize(times) if times else None
            g.tokens_per_second = _mean([r.tokens_per_second for r in ok])
            g.peak_mb = _mean([peak_mb(r) for r in ok])
            g.trainable_params = ok[0].trainable_params
        out.append(g)
    _compare_to_best(out)
    _pareto(out)
    return out


def _compare_to_best(groups: list[GroupSummary]) -> None:
    scored = [g for g in groups if g.accuracy is not None]
    if len(scored) < 2:
        return
    best = max(scored, key=lambda g: g.accuracy.mean)
    best_correct = correct_by_seed(best)
    if best_correct is None:
        return
    for g in scored:
        if g is best:
            continue
        other = correct_by_seed(g)
        if other is not None and g.runs[0].labels == best.runs[0].labels:  # the same test rows, in the same order
            g.vs_best = stats.compare(other, best_correct)


def _pareto(groups: list[GroupSummary]) -> None:
    for attr, cost in (("pareto_params", lambda g: g.trainable_params), ("pareto_time", lambda g: g.seconds and g.seconds.mean)):
        scored = [g for g in groups if g.accuracy is not None and cost(g)]
        front = stats.pareto_front([cost(g) for g in scored], [g.accuracy.mean for g in scored])
        for g, on in zip(scored, front):
            setattr(g, attr, on)


def best_group(groups: list[GroupSummary]) -> GroupSummary | None:
    scored = [g for g in groups if g.accuracy is not None]
    return max(scored, key=lambda g: g.accuracy.mean) if scored else None

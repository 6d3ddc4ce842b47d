"""PNG plots drawn from run results only (matplotlib, headless).

Each function takes results and a path, writes the PNG atomically and returns the path, or
None when no run has the numbers the plot needs.
"""

from __future__ import annotations

import os
from typing import Any

from peftlab.errors import WorkbenchError
from peftlab.io import atomic_write
from peftlab.lab.results import OK, RunResult


def _pyplot():  # noqa: ANN202 - matplotlib is an optional extra
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WorkbenchError("plots need matplotlib; pip install 'peftlab[lab]'.") from None
    return plt


def _save(fig, path: str) -> str:  # noqa: ANN001
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, write)
    _pyplot().close(fig)
    return path


def loss_curves(runs: list[RunResult], path: str) -> str | None:
    """Training loss against step, one line per method, with validation loss per epoch as markers."""
    drawn = [r for r in runs if r.loss_curve]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in drawn:
        steps, losses = zip(*run.loss_curve)
        (line,) = ax.plot(steps, losses, label=f"{run.name} (train)")
        evals = [(e.epoch, e.eval_loss) for e in run.epochs if e.eval_loss is not None]
        if evals and steps:
            per_epoch = max(steps) / max(e for e, _ in evals)
            ax.plot([e * per_epoch for e, _ in evals], [v for _, v in evals], "o", color=line.get_color(),
                    label=f"{run.name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


LABELS_IN_PLACE = 6
MARKERS = ("o", "s", "^", "D")


def _groups(runs: list[RunResult], raw: dict | None) -> list:
    from peftlab.lab.summary import summarize

    return [g for g in summarize(runs, raw or {}) if g.accuracy is not None]


def _accuracy_vs(groups: list, path: str, cost: Any, xlabel: str, title: str, exact: bool, split: str) -> str | None:
    """Mean accuracy against a cost (log x), ±1 std across seeds as error bars, the Pareto front as a step line."""
    drawn = [g for g in groups if cost(g)]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # A few runs are labelled in place; many (the all-methods study) cluster at similar sizes and
    # accuracies, where in-place labels print over each other: those get a legend, and a marker
    # shape per run next to the colour so that no two runs look alike.
    in_place = len(drawn) <= LABELS_IN_PLACE
    for i, g in enumerate(drawn):
        point = (cost(g), g.accuracy.mean)
        marker = MARKERS[(i // 10) % len(MARKERS)]
        scatter = ax.scatter(*point, s=40, marker=marker, label=g.name)
        if g.accuracy.std is not None:
            ax.errorbar(*point, yerr=g.accuracy.std, fmt="none", ecolor=scatter.get_facecolor()[0], capsize=3, lw=1)
        if in_place:
            ax.annotate(g.name, point, textcoords="offset points", xytext=(5, 4), fontsize=8)
    from peftlab.lab.stats import pareto_front

    front = sorted((cost(g), g.accuracy.mean) for g, on in zip(drawn, pareto_front([cost(g) for g in drawn],
                                                                                    [g.accuracy.mean for g in drawn])) if on)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", lw=0.8, ls="--", zorder=0)
    if not in_place:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    seeded = any(g.accuracy.std is not None for g in drawn)
    ax.set_ylabel(f"{split} accuracy (%)" + (" (causal LM: exact match)" if exact else "")
                  + (", mean ± std over seeds" if seeded else ""))
    ax.set_title(title + " (dashed: Pareto front)" if len(front) > 1 else title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _split(runs: list[RunResult]) -> str:
    return "test" if any(r.test_source for r in runs) else "validation"


def accuracy_vs_params(runs: list[RunResult], path: str, raw: dict | None = None) -> str | None:
    """Accuracy against trainable parameters (log scale): the efficiency frontier, with error bars over seeds."""
    exact = any(r.task == "causal_lm" for r in runs if r.status == OK)
    return _accuracy_vs(_groups(runs, raw), path, lambda g: g.trainable_params, "trainable parameters",
                        "Accuracy vs trainable parameters", exact, _split(runs))


def accuracy_vs_time(runs: list[RunResult], path: str, raw: dict | None = None) -> str | None:
    """Accuracy against training wall time: what a method costs in time rather than in parameters."""
    exact = any(r.task == "causal_lm" for r in runs if r.status == OK)
    return _accuracy_vs(_groups(runs, raw), path, lambda g: g.seconds.mean if g.seconds else None, "training time (s)",
                        "Accuracy vs training time", exact, _split(runs))


def sweep_curves(runs: list[RunResult], path: str, raw: dict | None = None) -> str | None:
    """Each run's dev accuracy over its swept learning rates: a method that is only badly tuned shows as such."""
    curves = {}
    for group, sel in ((raw or {}).get("selection") or {}).items():
        points = [(p["setting"]["learning_rate"], 100 * p["dev_accuracy"]) for p in sel.get("dev_curve") or []
                  if p.get("dev_accuracy") is not None and "learning_rate" in (p.get("setting") or {})]
        if points:
            curves[group] = (sorted(points), (sel.get("setting") or {}).get("learning_rate"))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (group, (points, chosen)) in enumerate(curves.items()):
        (line,) = ax.plot(*zip(*points), marker=MARKERS[(i // 10) % len(MARKERS)], label=group)
        best = [p for p in points if p[0] == chosen]
        if best:
            ax.scatter(*best[0], s=120, facecolors="none", edgecolors=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("dev accuracy (%) at the best epoch")
    ax.set_title("Learning-rate sweeps on dev (circled: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def time_memory_bars(runs: list[RunResult], path: str) -> str | None:
    """Training time and peak memory per method, side by side."""
    drawn = [r for r in runs if r.train_seconds is not None or r.peak_rss_mb is not None]
    if not drawn:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r.name for r in drawn]
    left.bar(names, [r.train_seconds or 0 for r in drawn], color="tab:blue")
    left.set_ylabel("training wall time (s)")
    left.set_title("Time")
    memory = [r.cuda_peak_mb if r.cuda_peak_mb is not None else (r.peak_rss_mb or 0) for r in drawn]
    label = "peak CUDA memory (MiB)" if any(r.cuda_peak_mb is not None for r in drawn) else "peak RSS (MiB)"
    right.bar(names, memory, color="tab:orange")
    right.set_ylabel(label)
    right.set_title("Memory")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def draw_all(runs: list[RunResult], folder: str, raw: dict | None = None) -> dict[str, str]:
    """Every plot for a study: title -> PNG path (plots without data are left out).

    ``raw`` is the results.json content; its run groups and sweep choices shape the summary plots."""
    from peftlab.lab.summary import final_runs

    finals = [r for members in final_runs(runs, raw or {}).values() for r in members[:1]]
    out: dict[str, str] = {}
    for title, fn, name in (
        ("Loss curves", lambda rs, p: loss_curves(finals, p), "loss_curves.png"),
        ("Accuracy vs trainable parameters", lambda rs, p: accuracy_vs_params(rs, p, raw), "accuracy_vs_params.png"),
        ("Accuracy vs training time", lambda rs, p: accuracy_vs_time(rs, p, raw), "accuracy_vs_time.png"),
        ("Learning-rate sweeps on dev", lambda rs, p: sweep_curves(rs, p, raw), "sweep_curves.png"),
        ("Time and memory", lambda rs, p: time_memory_bars(finals, p), "time_memory.png"),
    ):
        path = fn(runs, os.path.join(folder, name))
        if path is not None:
            out[title] = path
    return out

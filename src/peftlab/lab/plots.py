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


def examples_per_step(run: RunResult) -> int:
    """Training examples behind one optimizer step of ``run`` (batch x accumulation x processes)."""
    train = run.run.get("train") or {}
    return int(train.get("batch_size") or 1) * int(train.get("gradient_accumulation_steps") or 1) * int(run.world_size or 1)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (fewer at the start): a trend that lags, never leads."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(points: int) -> int:
    return max(1, min(25, points // 8))


def loss_curves(runs: list[RunResult], path: str) -> str | None:
    """Training loss against training examples seen (runs with other batch sizes line up), smoothed over
    the faint raw trace, with the validation loss after each epoch as dots."""
    drawn = [r for r in runs if r.loss_curve]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in drawn:
        per_step = examples_per_step(run)
        steps, losses = zip(*run.loss_curve)
        seen = [s * per_step for s in steps]
        (raw,) = ax.plot(seen, losses, lw=0.8, alpha=0.25)
        ax.plot(seen, smooth(list(losses), smoothing_window(len(losses))), lw=2, color=raw.get_color(), label=f"{run.name} (train)")
        evals = [(e.epoch, e.eval_loss) for e in run.epochs if e.eval_loss is not None]
        if evals and run.num_train:
            ax.plot([e * run.num_train for e, _ in evals], [v for _, v in evals], "o", color=raw.get_color(),
                    markeredgecolor="black", label=f"{run.name} (validation, per epoch)")
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("loss")
    ax.set_title("Loss against training examples seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


LABELS_IN_PLACE = 6
MARKERS = ("o", "s", "^", "D")


def _groups(runs: list[RunResult], raw: dict | None) -> list:
    from peftlab.lab.summary import summarize

    return [g for g in summarize(runs, raw or {}) if g.accuracy is not None]


def interval(g: Any) -> tuple[float, float, str]:
    """(low, high, what) in %: the 95% interval of a group's mean accuracy over its seeds, or with
    one seed the 95% binomial interval over its evaluated examples (what a second seed could not narrow)."""
    from peftlab.lab.stats import binomial_interval

    if g.accuracy.low is not None:
        return g.accuracy.low, g.accuracy.high, "seeds"
    run = g.runs[0]
    n = len(run.labels) if run.labels else (run.num_test or run.num_eval or 0)
    if not n:
        return g.accuracy.mean, g.accuracy.mean, "none"
    low, high = binomial_interval(g.accuracy.mean / 100, n)
    return 100 * low, 100 * high, "examples"


MIN_ACCURACY_SPAN = 10.0  # points: an axis narrower than this makes sampling noise look like a result


def accuracy_limits(lows: list[float], highs: list[float]) -> tuple[float, float]:
    """y limits that hold every interval with a margin and span at least MIN_ACCURACY_SPAN points (within 0-100)."""
    low, high = min(lows), max(highs)
    pad = max(0.15 * (high - low), 0.5)
    low, high = low - pad, high + pad
    if high - low < MIN_ACCURACY_SPAN:
        centre = (high + low) / 2
        low, high = centre - MIN_ACCURACY_SPAN / 2, centre + MIN_ACCURACY_SPAN / 2
    if low < 0:
        low, high = 0.0, max(high - low, MIN_ACCURACY_SPAN)
    if high > 100:
        low, high = min(low - (high - 100), 100 - MIN_ACCURACY_SPAN), 100.0
    return low, high


def _accuracy_vs(groups: list, path: str, cost: Any, xlabel: str, title: str, exact: bool, split: str) -> str | None:
    """Mean accuracy against a cost (log x) with each run's 95% interval (see :func:`interval`), the
    seeds as faint dots, the Pareto front as a step line, on an axis at least MIN_ACCURACY_SPAN wide."""
    drawn = [g for g in groups if cost(g)]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # A few runs are labelled in place; many (the all-methods study) cluster at similar sizes and
    # accuracies, where in-place labels print over each other: those get a legend, and a marker
    # shape per run next to the colour so that no two runs look alike.
    in_place = len(drawn) <= LABELS_IN_PLACE
    lows, highs, kinds = [], [], set()
    for i, g in enumerate(drawn):
        point = (cost(g), g.accuracy.mean)
        marker = MARKERS[(i // 10) % len(MARKERS)]
        scatter = ax.scatter(*point, s=40, marker=marker, label=g.name, zorder=3)
        colour = scatter.get_facecolor()[0]
        low, high, kind = interval(g)
        kinds.add(kind)
        lows.append(low)
        highs.append(high)
        if kind != "none":
            ax.errorbar(*point, yerr=[[max(0.0, point[1] - low)], [max(0.0, high - point[1])]], fmt="none", ecolor=colour, capsize=4, lw=1.2)
        if len(g.runs) > 1:
            ax.scatter([point[0]] * len(g.runs), [100 * r.accuracy for r in g.runs], s=12, color=colour, alpha=0.35, zorder=2)
        if in_place:
            ax.annotate(g.name, point, textcoords="offset points", xytext=(6, 4), fontsize=8)
    from peftlab.lab.stats import pareto_front

    front = sorted((cost(g), g.accuracy.mean) for g, on in zip(drawn, pareto_front([cost(g) for g in drawn],
                                                                                    [g.accuracy.mean for g in drawn])) if on)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", lw=0.8, ls="--", zorder=0)
    if not in_place:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    costs = [cost(g) for g in drawn]
    ax.set_xscale("log" if max(costs) >= 10 * min(costs) else "linear")  # log ticks inside one decade are unreadable
    ax.set_ylim(*accuracy_limits(lows, highs))
    ax.set_xlabel(xlabel)
    bars = {"seeds": "95% CI over seeds", "examples": "95% CI over eval examples"}
    ax.set_ylabel(f"{split} accuracy (%)" + (" (exact match)" if exact else "")
                  + (f"; bars: {', '.join(bars[k] for k in sorted(kinds) if k in bars)}" if kinds & set(bars) else ""),
                  fontsize=9)
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


def captions(runs: list[RunResult], raw: dict | None = None) -> dict[str, str]:
    """One sentence per plot title of :func:`draw_all`: what to read from it."""
    from peftlab.lab.summary import final_runs

    finals = [r for members in final_runs(runs, raw or {}).values() for r in members[:1]]
    seeded = any(len(members) > 1 for members in final_runs(runs, raw or {}).values())
    first = " (first seed of each run)" if seeded else ""
    logged = max((len(r.loss_curve) for r in finals if r.loss_curve), default=0)
    split = _split(runs)
    bars = ("95% intervals of the mean over seeds" if seeded else
            "95% intervals over the evaluated examples (one seed: what sampling the evaluation set alone leaves open)")
    accuracy = (f"Mean {split} accuracy with {bars}{' and each seed as a faint dot' if seeded else ''}; runs whose bars "
                f"overlap are not shown apart, whatever the order of the points.")
    return {
        "Loss curves": (f"Training loss{first} against examples seen, so that runs with other batch sizes line up: "
                        + (f"bold is a moving average over {smoothing_window(logged)} logged points, faint the loss as logged"
                           if smoothing_window(logged) > 1 else "the loss as logged")
                        + ", dots the validation loss after each epoch; a curve still falling at the end means more "
                          "epochs could help."),
        "Accuracy vs trainable parameters": accuracy.replace("Mean", "What each run buys per trainable parameter: mean", 1),
        "Accuracy vs training time": accuracy.replace("Mean", "What each run buys per second of training: mean", 1),
        "Learning-rate sweeps on dev": ("Dev accuracy at the best epoch for each swept learning rate; the circled point is "
                                        "the setting carried to the seeds, and a peak at the edge of the grid means the "
                                        "grid should be widened."),
        "Time and memory": (f"Training wall time (evaluation included) and peak memory of each run's own process{first}; "
                            f"lower is cheaper."),
    }

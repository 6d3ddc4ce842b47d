"""PNG plots drawn from run results only (matplotlib, headless).

Each function takes results and a path, writes the PNG atomically and returns the path, or
None when no run has the numbers the plot needs.
"""

from __future__ import annotations

import os

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


def accuracy_vs_params(runs: list[RunResult], path: str) -> str | None:
    """Validation accuracy against trainable parameters (log scale): the efficiency frontier."""
    drawn = [r for r in runs if r.status == OK and r.accuracy is not None and r.trainable_params]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # A few runs are labelled in place; many (the all-methods study) cluster at similar sizes and
    # accuracies, where in-place labels print over each other: those get a legend, and a marker
    # shape per run next to the colour so that no two runs look alike.
    in_place = len(drawn) <= LABELS_IN_PLACE
    for i, run in enumerate(drawn):
        point = (run.trainable_params, 100 * run.accuracy)
        ax.scatter(*point, s=40, marker=MARKERS[(i // 10) % len(MARKERS)], label=run.name)
        if in_place:
            ax.annotate(run.name, point, textcoords="offset points", xytext=(5, 4), fontsize=8)
    if not in_place:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    exact = any(r.task == "causal_lm" for r in drawn)
    ax.set_ylabel("validation accuracy (%)" + (" (causal LM: exact match)" if exact else ""))
    ax.set_title("Accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
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


def draw_all(runs: list[RunResult], folder: str) -> dict[str, str]:
    """Every plot for a study: title -> PNG path (plots without data are left out)."""
    out: dict[str, str] = {}
    for title, fn, name in (
        ("Loss curves", loss_curves, "loss_curves.png"),
        ("Accuracy vs trainable parameters", accuracy_vs_params, "accuracy_vs_params.png"),
        ("Time and memory", time_memory_bars, "time_memory.png"),
    ):
        path = fn(runs, os.path.join(folder, name))
        if path is not None:
            out[title] = path
    return out

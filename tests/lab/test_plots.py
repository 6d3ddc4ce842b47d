"""The accuracy-vs-parameters plot: labels in place for a few runs, a legend for many."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from peftlab.lab import plots  # noqa: E402
from peftlab.lab.results import OK, RunResult  # noqa: E402


def _runs(n: int) -> list[RunResult]:
    return [RunResult(name=f"run{i}", method="lora", status=OK, trainable_params=1000 * (i + 1), accuracy=0.7 + 0.01 * i)
            for i in range(n)]


@pytest.mark.parametrize("n, legend", [(3, False), (plots.LABELS_IN_PLACE + 10, True)])
def test_accuracy_plot_labels_few_runs_in_place_and_many_in_a_legend(tmp_path, monkeypatch, n, legend):
    seen = {}
    real_save = plots._save

    def spy(fig, path):  # noqa: ANN001
        ax = fig.axes[0]
        seen["annotations"] = [t.get_text() for t in ax.texts]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None
        from matplotlib.collections import PathCollection  # the markers (error bars are LineCollections)

        seen["looks"] = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in ax.collections
                         if isinstance(c, PathCollection)}
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    path = plots.accuracy_vs_params(_runs(n), str(tmp_path / "acc.png"))
    assert path and (tmp_path / "acc.png").stat().st_size > 1000
    names = [f"run{i}" for i in range(n)]
    if legend:
        assert seen["legend"] == names and seen["annotations"] == []
        assert len(seen["looks"]) == n  # colour + marker tell every run apart
    else:
        assert seen["annotations"] == names and seen["legend"] is None


def test_loss_is_drawn_against_examples_seen_so_batch_sizes_line_up(tmp_path, monkeypatch):
    from peftlab.lab.results import EpochRecord

    # the same 64 examples: batch 8 logs 8 steps, batch 16 logs 4
    small = RunResult(name="b8", method="ia3", status=OK, run={"train": {"batch_size": 8}}, num_train=64,
                      loss_curve=[[float(s), 0.7 - 0.01 * s] for s in range(1, 9)], epochs=[EpochRecord(1, 0.6, 0.5, 0.8)])
    large = RunResult(name="b16", method="lora", status=OK, run={"train": {"batch_size": 16, "gradient_accumulation_steps": 1}},
                      num_train=64, loss_curve=[[float(s), 0.7 - 0.02 * s] for s in range(1, 5)])
    seen = {}

    def spy(fig, path):  # noqa: ANN001
        ax = fig.axes[0]
        seen["lines"] = {line.get_label(): (list(line.get_xdata()), line.get_alpha()) for line in ax.get_lines()}
        seen["xlabel"] = ax.get_xlabel()
        return path

    monkeypatch.setattr(plots, "_save", spy)
    plots.loss_curves([small, large], str(tmp_path / "loss.png"))
    assert seen["xlabel"] == "training examples seen"
    assert seen["lines"]["b8 (train)"][0][-1] == seen["lines"]["b16 (train)"][0][-1] == 64  # both end at 64 examples
    assert seen["lines"]["b8 (validation, per epoch)"][0] == [64]  # after epoch 1 = 64 examples
    faint = [alpha for label, (_, alpha) in seen["lines"].items() if label.startswith("_")]
    assert faint == [0.25, 0.25]  # the raw traces, under the smoothed ones


def test_smoothing_is_a_trailing_mean():
    assert plots.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plots.smooth([2.0, 4.0], 1) == [2.0, 4.0]


def test_accuracy_axis_holds_every_interval_and_is_never_a_zoom_on_noise():
    low, high = plots.accuracy_limits([79.9, 80.1], [80.4, 80.6])  # a 0.7-point spread
    assert high - low == pytest.approx(plots.MIN_ACCURACY_SPAN) and low < 79.9 and high > 80.6
    low, high = plots.accuracy_limits([60.0, 75.0], [70.0, 90.0])
    assert low < 60.0 and high > 90.0
    low, high = plots.accuracy_limits([97.0], [99.9])
    assert high == 100.0 and high - low >= plots.MIN_ACCURACY_SPAN


def test_each_run_gets_an_interval_over_seeds_or_else_over_its_examples():
    from peftlab.lab.stats import binomial_interval
    from peftlab.lab.summary import summarize

    seeded = [RunResult(name=f"a.s{i}", method="lora", status=OK, accuracy=acc, run={"train": {"seed": i}})
              for i, acc in enumerate((0.80, 0.82, 0.81))]
    (group,) = summarize(seeded, {"groups": {"a": [r.name for r in seeded]}})
    low, high, kind = plots.interval(group)
    assert kind == "seeds" and low < 81.0 < high and (low, high) == (group.accuracy.low, group.accuracy.high)
    single = RunResult(name="b", method="ia3", status=OK, accuracy=0.8, labels=[0, 1] * 436)
    (group,) = summarize([single], {})
    low, high, kind = plots.interval(group)
    # 80% of 872 examples: Wilson's interval is about +-2.65 points
    assert kind == "examples" and (low, high) == pytest.approx(tuple(100 * v for v in binomial_interval(0.8, 872)))
    assert 2.5 < 80 - low < 2.8 and 2.5 < high - 80 < 2.8

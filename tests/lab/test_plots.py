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
        seen["looks"] = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in ax.collections}
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

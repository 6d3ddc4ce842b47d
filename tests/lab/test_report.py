"""The report from results alone: the summary over seeds (marks only differences that hold), the
classic per-epoch table with time and memory against full fine-tuning, and the best-epoch restore."""

from __future__ import annotations

import torch

from peftlab.lab import report, selection
from peftlab.lab.results import OK, EpochRecord, RunResult

LABELS = [i % 2 for i in range(200)]


def _run(name, method, seed, wrong, **kw):
    """A finished run whose predictions are right except on the rows in ``wrong``."""
    preds = [1 - l if i in wrong else l for i, l in enumerate(LABELS)]
    return RunResult(name=name, method=method, status=OK, run={"group": name.split(".")[0], "train": {"seed": seed}},
                     accuracy=1 - len(wrong) / len(LABELS), predictions=preds, labels=list(LABELS),
                     trainable_params=kw.get("params", 1000), total_params=100_000, train_seconds=kw.get("seconds", 10.0),
                     peak_rss_mb=kw.get("mb", 500.0), test_source="validation", dev_accuracy=0.9, best_epoch=1,
                     num_train=800, num_eval=100, num_test=200, eval_source="10% of train (stratified)")


def test_summary_marks_a_difference_only_when_it_holds_across_seeds():
    runs = [_run("a.s0", "lora", 0, set()), _run("a.s1", "lora", 1, {0}),
            _run("b.s0", "ia3", 0, set(range(40))), _run("b.s1", "ia3", 1, set(range(50))),  # 20-25 points behind
            _run("c.s0", "full", 0, set(range(1, 3))), _run("c.s1", "full", 1, set())]  # behind at s0, tied at s1
    raw = {"seeds": [0, 1], "groups": {"a": ["a.s0", "a.s1"], "b": ["b.s0", "b.s1"], "c": ["c.s0", "c.s1"]}}
    md = report.markdown("s", runs, raw)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| best |" in rows["a"] and "99.75 ± 0.35" in rows["a"]
    assert "**worse**" in rows["b"] and "-22.25" in rows["b"]  # (0 + 0.5 - 20 - 25) / 2 points
    assert "(n.s.)" in rows["c"]  # tied at one seed: not shown to differ
    assert "**test** validation (200 rows)" in md and "paired bootstrap" in md


def test_classic_table_has_epochs_params_and_deltas_against_full():
    full = RunResult(name="full", method="full", status=OK, trainable_params=1000, total_params=1000, train_seconds=20.0,
                     peak_rss_mb=800.0, epochs=[EpochRecord(1, 0.6, 0.5, 0.8, 0.8, 10.0), EpochRecord(2, 0.4, 0.45, 0.85, 0.84, 10.0)])
    lora = RunResult(name="lora-r8", method="lora", status=OK, trainable_params=10, total_params=1000, train_seconds=5.0,
                     peak_rss_mb=600.0, epochs=[EpochRecord(1, 0.7, 0.6, 0.75, 0.7, 2.5), EpochRecord(2, 0.5, 0.5, 0.8, 0.79, 2.5)])
    lines = report.epoch_table([full, lora])
    assert lines[0] == ("| run | trainable params | epoch | train loss | validation loss | validation accuracy | validation F1 | "
                        "epoch time (s) | train time (s) | time vs full | peak memory (MiB) | memory vs full |")
    assert lines[4] == "| lora-r8 | 10 (1.00%) | 1 | 0.7000 | 0.6000 | 75.00 | 70.00 | 2.5 | 5.0 | -75% | 600 | -25% |"
    assert lines[5].startswith("|  |  | 2 | 0.5000 | 0.5000 | 80.00 | 79.00 | 2.5 |")
    assert len(lines) == 6


def test_best_epoch_is_restored(tmp_path):
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model.add_module("frozen", frozen)
    from peftlab.lab.callbacks import BestEpoch

    callback = BestEpoch(str(tmp_path))
    control = SimpleNamespace()
    snapshots = []
    for epoch, (acc, loss) in enumerate([(0.6, 0.9), (0.8, 0.7), (0.8, 0.8), (0.7, 0.5)], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        snapshots.append(model.weight.detach().clone())
        callback.on_evaluate(None, SimpleNamespace(epoch=float(epoch)), control, model=model,
                             metrics={"eval_accuracy": acc, "eval_loss": loss})
    with torch.no_grad():
        model.weight.fill_(-1)
    best = selection.restore_best(model, str(tmp_path))
    assert best == {"accuracy": 0.8, "loss": 0.7, "epoch": 2.0}  # a tie on accuracy goes to the lower loss, then the earlier
    assert torch.equal(model.weight, snapshots[1])
    assert selection.restore_best(model, str(tmp_path / "none")) is None


def test_the_report_leads_with_a_verdict_per_comparison_and_counts_seeds():
    runs = [_run("a.s0", "lora", 0, set()), _run("a.s1", "lora", 1, {0}),
            _run("b.s0", "ia3", 0, set(range(40))), _run("b.s1", "ia3", 1, set(range(50))),
            _run("c.s0", "full", 0, set(range(1, 3))), _run("c.s1", "full", 1, set())]
    raw = {"seeds": [0, 1], "groups": {"a": ["a.s0", "a.s1"], "b": ["b.s0", "b.s1"], "c": ["c.s0", "c.s1"]}}
    md = report.markdown("s", runs, raw)
    verdict = md.split("## Verdict\n\n")[1].split("\n\n")[0].splitlines()
    assert verdict[0] == "- Highest test accuracy: **a**, 99.75 ± 0.35% (2 seeds)."
    assert verdict[1].startswith("- **b is worse than a** (2 seeds): -22.25 points, 95% interval [") and "every seed" in verdict[1]
    assert verdict[2].startswith("- c and a are not shown to differ (2 seeds): -0.25 points, 95% interval [")
    assert md.index("## Verdict") < md.index("Splits:") < md.index("## Summary")
    seeds = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in md.split("## Summary")[1].splitlines()
             if line.startswith("| ") and not line.startswith("| run")}
    assert seeds == {"a": "2 (seeds 0, 1)", "b": "2 (seeds 0, 1)", "c": "2 (seeds 0, 1)"}

    one = [_run("x", "lora", 0, set()), _run("y", "ia3", 0, {3})]
    md = report.markdown("one", one, {})
    assert "- Highest test accuracy: **x**, 100.00% (1 seed: its ± over seeds is unknown)." in md
    assert "- y and x are not shown to differ (1 seed, which cannot test it): -0.50 points" in md
    assert "| 1 (seed 0) |" in md  # one seed, named: a bare "0" read as "no seeds"


def test_configurations_are_collapsed_sections_and_plots_have_captions(tmp_path):
    from peftlab.lab.results import save_study

    runs = [_run("x", "lora", 0, set()), _run("y", "ia3", 0, {3})]
    for r in runs:
        r.run["train"]["learning_rate"] = 0.003
        r.config = {"peft_type": "LORA", "r": 8}
        r.loss_curve = [[1.0, 0.7], [2.0, 0.6]]
        r.epochs = [EpochRecord(1, 0.6, 0.5, 0.8, 0.8, 10.0)]
    save_study(str(tmp_path), "cfg", runs)
    report.build(str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert page.count("<details><summary>") == 2 and "<summary><b>x</b>: lora, lr 0.003, r 8, seed 0</summary>" in page
    assert page.index('<div class="verdict">') < page.index("<table>")  # the verdict leads
    captions = [c.split("</figcaption>")[0] for c in page.split("<figcaption>")[1:]]
    assert len(captions) == 4 and all(c.startswith("<b>") and c.rstrip().endswith(".") and len(c) > 80 for c in captions)
    assert "## Per epoch" in (tmp_path / "results.md").read_text()  # the per-epoch table stays

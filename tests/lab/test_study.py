"""A study with seeds, a learning-rate sweep and a held-out test split, end to end on a tiny BERT:
the choice on dev, the report's sections, reuse of finished runs, extension by a seed, --dry-run."""

from __future__ import annotations

import json

import pytest
import yaml

from peftlab.lab import study
from peftlab.lab.cli import main
from _labutil import tiny_model_dir, toy_data_dir, toy_rows  # noqa: F401 - fixtures

FLAGS = ["--epochs", "2", "--batch-size", "8", "--no-progress", "--cpu"]


@pytest.fixture
def in_process(monkeypatch):
    """Train each run in this process (the subprocess path is tested in test_cli): the same
    execute() the worker calls, without a Python start-up per run."""
    from peftlab.lab.runner import execute

    def run_here(run, folder):  # noqa: ANN001
        return execute(run, folder)

    monkeypatch.setattr(study, "run_in_subprocess", run_here)


def _study_file(tmp_path, data_dir, model_dir):
    spec = {"name": "honest", "model": str(model_dir), "output_dir": str(tmp_path / "out"),
            "data": {"dataset": str(data_dir), "dev_split": 0.25},
            "seeds": [0, 1],
            "runs": [{"name": "full", "method": "full", "train": {"learning_rate": 1e-3}},
                     {"name": "lora", "method": "lora", "options": {"r": 4, "target_modules": ["query", "value"]},
                      "sweep": {"learning_rate": [1e-5, 3e-2]}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_seeded_swept_study_chooses_on_dev_reports_test_and_resumes(tmp_path, tiny_model_dir, toy_data_dir, capsys, in_process):
    path = _study_file(tmp_path, toy_data_dir, tiny_model_dir)
    out = tmp_path / "out"
    assert main(["compare", str(path), "--dry-run", *FLAGS]) == 0
    plan = capsys.readouterr().out
    assert "lora.lr1e-05.s0" in plan and "lora.<best>.s1" in plan and "full.s1" in plan and "5 runs to train" in plan
    assert not out.exists()  # a dry run writes nothing

    assert main(["compare", str(path), *FLAGS]) == 0, capsys.readouterr().err
    assert "5 runs trained, 1 reused" in capsys.readouterr().out  # lora's sweep run at the chosen rate is its seed 0
    data = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    sel = data["selection"]["lora"]
    curve = {p["setting"]["learning_rate"]: p["dev_accuracy"] for p in sel["dev_curve"]}
    best = max(curve, key=lambda lr: (curve[lr], -list(curve).index(lr)))  # ties: the first in grid order
    assert sel["setting"] == {"learning_rate": best}  # the dev accuracies decide
    assert set(runs) == {"full.s0", "full.s1", "lora.lr1e-05.s0", "lora.lr0.03.s0", f"lora.lr{best:g}.s1"}
    assert data["groups"]["lora"] == [f"lora.lr{best:g}.s0", f"lora.lr{best:g}.s1"] and data["seeds"] == [0, 1]
    for r in runs.values():
        assert r["status"] == "ok" and r["test_source"] == "validation" and r["num_test"] == 24 and r["num_eval"] == 16
        assert r["labels"] == [x["label"] for x in toy_rows(24, 1)] and len(r["predictions"]) == 24
        assert r["accuracy"] == sum(p == l for p, l in zip(r["predictions"], r["labels"])) / 24  # test accuracy
        dev_at_best = next(e["accuracy"] for e in r["epochs"] if e["epoch"] == r["best_epoch"])
        assert r["dev_accuracy"] == dev_at_best == max(e["accuracy"] for e in r["epochs"])
        assert r["tokens_per_second"] > 0 and r["config_hash"]
    md = (out / "results.md").read_text()
    for section in ("**test** validation (24 rows)", "## Summary over seeds", "mean ± std", "95% interval", "paired bootstrap",
                    "## Sweeps", "## Per epoch (first seed of each run)", "| dev loss | dev accuracy |", "Pareto"):
        assert section in md, section
    assert (out / "plots" / "sweep_curves.png").stat().st_size > 1000

    # Nothing changed: nothing trains. A lost run (as if killed) and one more seed: only those train.
    assert main(["compare", str(path), *FLAGS]) == 0
    assert "0 runs trained, 6 reused" in capsys.readouterr().out
    (out / "runs" / "full.s1" / "result.json").unlink()
    assert main(["compare", str(path), "--seeds", "3", "--methods", "full", *FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "2 runs trained, 1 reused" in printed  # full.s1 again and the new full.s2
    # the study line: run k of the n to train, after the probe's estimate; reused runs are not counted
    assert "== run 1 of 2: full.s1 (full), " in printed and "== run 2 of 2: full.s2 (full), " in printed
    assert "full.s0 (full)" not in printed and "left (probe estimate" in printed
    assert len(json.loads((out / "results.json").read_text())["groups"]["full"]) == 3


def test_time_estimate_arithmetic(tmp_path):
    from peftlab.lab.budget import Probe, estimate_seconds
    from peftlab.lab.experiment import DataConfig, RunConfig, TrainConfig

    run = RunConfig(name="r", method="lora", model="m", data=DataConfig(dataset="d", dev_split=0.25),
                    train=TrainConfig(epochs=2, batch_size=8))
    probe = Probe(setup_seconds=2.0, step_seconds=0.5, eval_row_seconds=0.01, n_train=64, n_eval=16, n_test=24)
    # 2 epochs x 8 steps at 0.5 s, dev (16 rows) after each epoch + test (24 rows) once, at 0.01 s a row
    assert estimate_seconds(run, probe) == pytest.approx(2.0 + 16 * 0.5 + (2 * 16 + 24) * 0.01, rel=1e-12)
    run.train.gradient_accumulation_steps = 2  # half the optimizer steps, each of two batches: the same batches
    assert estimate_seconds(run, probe) == pytest.approx(2.0 + 16 * 0.5 + (2 * 16 + 24) * 0.01, rel=1e-12)


def test_group_by_length_gives_the_trainer_length_grouped_batches_and_the_probe_such_batches(tmp_path, tiny_model_dir,
                                                                                              toy_data_dir, monkeypatch):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftlab.lab import budget
    from peftlab.lab.experiment import DataConfig, RunConfig, TrainConfig
    from peftlab.lab.runner import _make_trainer
    from peftlab.lab.setup import Prepared

    def run(grouped: bool) -> RunConfig:
        return RunConfig(name="r", method="lora", model=str(tiny_model_dir), options={"target_modules": ["query"]},
                         data=DataConfig(dataset=str(toy_data_dir), max_length=16),
                         train=TrainConfig(batch_size=8, cpu=True, group_by_length=grouped))

    for grouped in (False, True):
        prep = Prepared(run(grouped))
        trainer, _, _ = _make_trainer(run(grouped), prep, str(tmp_path / "ckpt"))
        assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler) == grouped
    # the probe times batches of rows of similar length, as the grouped run will train on
    lengths = [len(row["input_ids"]) for row in prep.train_set]
    order = budget._by_length(prep.train_set)
    assert [lengths[i] for i in order] == sorted(lengths)
    seen = []
    real_collator = prep.task.collator

    def spy(rows):  # noqa: ANN001
        seen.append(sorted(len(r["input_ids"]) for r in rows if "labels" in r))
        return real_collator(rows)

    monkeypatch.setattr(budget, "PROBE_STEPS", 3)
    original = Prepared.__init__

    def prepared_with_spy(self, r):  # noqa: ANN001
        original(self, r)
        self.task = type(self.task)(collator=spy, compute_metrics=self.task.compute_metrics)

    monkeypatch.setattr(Prepared, "__init__", prepared_with_spy)
    budget.probe(run(True))
    train_batches = seen[1:4]  # after the warm-up step; then the evaluation batches
    spreads = [b[-1] - b[0] for b in train_batches]
    assert max(spreads) <= 1  # each timed batch holds rows of (nearly) one length
    assert train_batches[0][0] < train_batches[-1][0]  # at spread-out lengths, not the shortest rows only

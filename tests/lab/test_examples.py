"""Every shipped experiment file parses, names registered methods with valid options and its
data by name, and the offline variants find that data locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.lab import named_data
from peftlab.lab.experiment import build_experiment, load_file
from peftlab.lab.methods import build_config
from _labutil import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_studies_are_shipped():
    names = {p.stem for p in EXAMPLES}
    assert {"imdb_distilbert", "imdb_minilm_offline", "bert_full_vs_lora", "bert_full_vs_lora_offline", "yelp_ia3",
            "yelp_ia3_offline", "minilm_sst2_compare"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    experiment = build_experiment(load_file(path), base_dir=ROOT)
    assert experiment.runs
    for run in experiment.runs:
        build_config(run.method, run.options)  # raises on unknown methods / options
        # Data by name, never a path into the team's folders: a fresh clone resolves it too.
        assert named_data.is_named(run.data.dataset) and "shared" not in run.data.dataset, run.data.dataset


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "offline" in p.stem or "minilm" in p.stem], ids=lambda p: p.stem)
def test_offline_examples_find_their_data_locally(path, monkeypatch):
    if not any(folder is not None and folder.is_dir() for _, folder in named_data.local_candidates("sst2")):
        pytest.skip("no local copy of the data sets (set PEFTLAB_DATA, or put shared/data beside the checkout)")
    for run in build_experiment(load_file(path), base_dir=ROOT).runs:
        assert Path(named_data.resolve(run.data.dataset)).exists()


def test_imdb_study_settings():
    exp = build_experiment(load_file(ROOT / "examples" / "imdb_distilbert.yaml"), base_dir=ROOT)
    runs = {r.name: r for r in exp.runs}
    assert all(r.data.max_length == 50 and r.data.validation_split == 0.2 for r in exp.runs)
    assert runs["lora-r64-attn"].options == {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
                                             "target_modules": ["q_lin", "k_lin", "v_lin", "out_lin"]}
    assert runs["lora-r64-attn-ffn"].options["target_modules"][-2:] == ["ffn.lin1", "ffn.lin2"]
    assert (runs["lora-r32"].options["r"], runs["lora-r32"].options["lora_alpha"], runs["lora-r32"].options["lora_dropout"]) == (32, 32, 0.2)
    assert runs["ia3"].options["feedforward_modules"] == ["ffn.lin1", "ffn.lin2"]


def test_classic_study_file():
    exp = build_experiment(load_file(ROOT / "examples" / "minilm_sst2_classic.yaml"), base_dir=ROOT)
    runs = {r.name: r for r in exp.runs}
    assert list(runs) == ["full", "lora-r8", "lora-r16", "lora-all-linear", "ia3"]
    assert all(r.train.epochs == 5 and r.data.dev_split == 872 for r in exp.runs)  # held-out: dev from train, test = validation
    assert (runs["lora-r8"].options["r"], runs["lora-r16"].options["r"]) == (8, 16)
    assert runs["lora-all-linear"].options["target_modules"] == "all-linear" and runs["ia3"].method == "ia3"


def test_all_methods_seeds_study_plans_each_methods_own_grid():
    from peftlab.lab import sweep
    from peftlab.registry import method_for

    exp = build_experiment(load_file(ROOT / "examples" / "minilm_sst2_all_methods_seeds.yaml"), base_dir=ROOT)
    groups = sweep.plan(exp)
    assert len(groups) == 16 and all(g.seeds == [0, 1, 2] and g.swept for g in groups)
    by_name = {g.name: g for g in groups}
    assert [s["learning_rate"] for s in by_name["prompt_tuning"].settings] == list(method_for("PROMPT_TUNING").learning_rates)
    assert [s["learning_rate"] for s in by_name["full"].settings] == [1e-5, 3e-5, 1e-4]
    assert by_name["ia3"].base.train.head_learning_rate == 1e-3  # the head keeps its own rate; the adapter's is swept

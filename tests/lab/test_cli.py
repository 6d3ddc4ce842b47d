"""The peftlab command end to end on a tiny BERT: train, compare, report, inspect, bad input."""

from __future__ import annotations

import base64
import json
import os

import pytest
from safetensors.torch import load_file

from peftlab.lab.cli import main
from _labutil import run_cli, tiny_model_dir, toy_data_dir, toy_rows, write_jsonl  # noqa: F401 - fixtures

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--no-progress", "--cpu"]


def _train(tmp_path, model_dir, data_dir, *extra, out="out"):
    return main(["train", "--model", str(model_dir), "--dataset", str(data_dir), "--output-dir", str(tmp_path / out), *FAST, *extra])


def test_train_writes_results_adapter_and_report(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    code = _train(tmp_path, tiny_model_dir, toy_data_dir, "--method", "lora", "--option", "r=4",
                  "--option", "target_modules=[query,value]", "--logging-steps", "2")
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == "ok" and run["method"] == "lora" and run["error"] is None
    assert run["config"]["r"] == 4 and run["config"]["peft_type"] == "LORA"
    # trainable = LoRA on query/value in 2 layers (2 * 2 * (4*32 + 32*4)) + classifier copy (32*2 + 2)
    assert run["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4) + 66
    assert run["total_params"] > run["trainable_params"]
    assert [e["epoch"] for e in run["epochs"]] == [1, 2]
    for e in run["epochs"]:
        assert e["train_loss"] > 0 and e["eval_loss"] > 0 and 0 <= e["accuracy"] <= 1 and 0 <= e["f1"] <= 1 and e["seconds"] > 0
    assert run["accuracy"] == run["epochs"][-1]["accuracy"]
    assert [step for step, _ in run["loss_curve"]] == [2, 4, 6, 8, 10, 12, 14, 16]  # 2 epochs x 8 steps, logged every 2
    assert run["peak_rss_mb"] > 50 and run["train_seconds"] > 0 and run["total_seconds"] >= run["train_seconds"]
    assert run["num_train"] == 64 and run["num_eval"] == 24 and run["eval_source"] == "validation"
    env = run["environment"]
    assert env["versions"]["torch"] and env["versions"]["transformers"] and "git_commit" in env
    adapter = out / "runs" / "lora" / run["adapter_dir"]
    assert run["adapter_bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
    assert any(k.endswith("lora_A.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    assert not (out / "runs" / "lora" / "checkpoints").exists()  # removed after success unless kept
    md = (out / "results.md").read_text()
    assert "| lora | lora | ok |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<img" in html and "src=\"plots" not in html
    png = base64.b64decode(html.split("data:image/png;base64,")[1].split('"')[0])
    assert png.startswith(b"\x89PNG")
    assert {p.name for p in (out / "plots").iterdir()} == {"loss_curves.png", "accuracy_vs_params.png", "accuracy_vs_time.png",
                                                          "time_memory.png"}
    # without a held-out split the report says so; the run keeps its per-example predictions
    assert "There is no held-out test split" in md and len(run["predictions"]) == len(run["labels"]) == 24
    assert run["labels"] == [r["label"] for r in toy_rows(24, 1)]
    assert run["tokens_per_second"] > 0 and run["train_tokens"] > 64

    # report rebuilds everything from results.json alone
    for name in ("results.md", "report.html"):
        (out / name).unlink()
    for png_file in (out / "plots").iterdir():
        png_file.unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_compare_isolates_a_failed_run(tmp_path, tiny_model_dir, toy_data_dir):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
name: toy-compare
model: {tiny_model_dir}
data: {{dataset: {toy_data_dir}, max_length: 16}}
train: {{epochs: 1, batch_size: 16, learning_rate: 0.01, progress: false, cpu: true}}
runs:
  - {{name: full, method: full, train: {{learning_rate: 1e-4}}}}
  - {{name: broken, method: lora, options: {{target_modules: [no_such_layer]}}}}
  - {{name: ia3, method: ia3}}
""", encoding="utf-8")
    proc = run_cli("compare", str(exp), "--output-dir", str(tmp_path / "cmp"))
    assert proc.returncode == 1, proc.stderr[-2000:]  # one run failed
    data = json.loads((tmp_path / "cmp" / "results.json").read_text())
    status = {r["name"]: r["status"] for r in data["runs"]}
    assert status == {"full": "ok", "broken": "failed", "ia3": "ok"}
    broken = next(r for r in data["runs"] if r["name"] == "broken")
    assert "no_such_layer" in broken["error"] and "\n" not in broken["error"]
    full, ia3 = (next(r for r in data["runs"] if r["name"] == n) for n in ("full", "ia3"))
    assert full["trainable_params"] == full["total_params"] and ia3["trainable_params"] < full["trainable_params"] / 10
    assert (tmp_path / "cmp" / "runs" / "full" / "model").is_dir() and (tmp_path / "cmp" / "runs" / "ia3" / "adapter").is_dir()
    # Each run's memory is its own process's: both recorded, neither zero.
    assert full["peak_rss_mb"] > 50 and ia3["peak_rss_mb"] > 50
    assert "broken" in (tmp_path / "cmp" / "results.md").read_text()


def test_inspect_lists_modules_and_defaults(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in out and "Linear" in out and "32x32" in out and "1,056" in out
    assert "bert.encoder.layer.1.attention.self.query" not in out  # repeated block folded
    assert "lora" in out and "['query', 'value']" in out and "ia3" in out
    assert main(["inspect", str(tiny_model_dir), "--all"]) == 0
    assert "bert.encoder.layer.1.attention.self.query" in capsys.readouterr().out


def _bad_data(tmp_path, name, rows):
    folder = tmp_path / name
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", toy_rows(4, 1))
    return folder


@pytest.mark.parametrize("case", ["unknown_method", "unknown_option", "missing_column", "string_labels", "empty", "hub_offline",
                                  "missing_model", "resume_without_checkpoint"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, tiny_model_dir, toy_data_dir, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data, method = str(tiny_model_dir), str(toy_data_dir), ["--method", "lora"]
    extra: list[str] = []
    expected = {
        "unknown_method": "unknown method 'lorra'", "unknown_option": "unknown options ['rank']",
        "missing_column": "column 'text' not found", "string_labels": "not a class index", "empty": "split is empty",
        "hub_offline": "no-such-user/no-such-data", "missing_model": "cannot load model",
        "resume_without_checkpoint": "no checkpoint",
    }[case]
    if case == "unknown_method":
        method = ["--method", "lorra"]
    elif case == "unknown_option":
        method += ["--option", "rank=8"]
    elif case == "missing_column":
        data = str(_bad_data(tmp_path, "d", [{"sentence": "x", "label": 0}]))
    elif case == "string_labels":
        data = str(_bad_data(tmp_path, "d", [{"text": "x", "label": "positive"}]))
    elif case == "empty":
        data = str(_bad_data(tmp_path, "d", []))
    elif case == "hub_offline":
        data = "no-such-user/no-such-data"
    elif case == "missing_model":
        model = str(tmp_path / "no-model-here")
    elif case == "resume_without_checkpoint":
        extra = ["--resume"]
    out = tmp_path / "out"
    code = main(["train", "--model", model, "--dataset", data, "--output-dir", str(out), *method, *extra, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("peftlab: error: ") and expected in err[0], err
    assert not out.exists()


def test_real_command_exit_status(tmp_path, toy_data_dir):
    proc = run_cli("compare", "--methods", "full,lorra", "--model", "x", "--dataset", str(toy_data_dir),
                   "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("peftlab: error: unknown method 'lorra'")
    assert not (tmp_path / "o").exists()
    proc = run_cli("report", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "results.json not found" in proc.stderr


def test_adalora_run_gets_its_step_count_and_callback(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """AdaLoRA's total_step comes from the run's length (2 epochs x 8 steps) and the budget shrinks."""
    code = _train(tmp_path, tiny_model_dir, toy_data_dir, "--method", "adalora", "--option", "init_r=4",
                  "--option", "target_r=2", "--option", "tinit=2", "--option", "tfinal=4",
                  "--option", "target_modules=[query,value]")
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["config"]["total_step"] == 16
    saved = json.loads((tmp_path / "out" / "runs" / "adalora" / run["adapter_dir"] / "adapter_config.json").read_text())
    assert saved["total_step"] == 16
    assert saved["rank_pattern"]  # the callback ran the budget allocation, which records the ranks kept
    assert run["config"]["rank_pattern"] == saved["rank_pattern"]  # the run record holds the final ranks too


def test_bf16_flag_trains_under_bfloat16_autocast(tmp_path, tiny_model_dir, toy_data_dir, capsys, monkeypatch):
    import torch

    seen = []
    real_forward = torch.nn.Linear.forward

    def spy(self, x):
        out = real_forward(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    code = _train(tmp_path, tiny_model_dir, toy_data_dir, "--method", "full", "--bf16")
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["run"]["train"]["bf16"] is True
    assert seen and set(seen) == {torch.bfloat16}
    assert all(e["train_loss"] > 0 for e in run["epochs"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| precision |" in table and "| bf16 autocast |" in table


def _lines(path, lines: list[bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("case", ["non_utf8_jsonl", "huge_label", "stray_label", "eval_label_outside", "shuffled_row_line",
                                  "deep_experiment", "non_utf8_experiment", "modules_to_save_number", "name_dotdot",
                                  "output_dir_under_file"])
def test_more_bad_input_one_line_exit_2(tmp_path, tiny_model_dir, toy_data_dir, capsys, case):
    """Issue 17's inputs that used to end in tracebacks (or silently wrong runs): one line, exit 2, nothing written."""
    good = [json.dumps(r).encode() for r in toy_rows(60, 0)]
    data, method, extra, out = str(toy_data_dir), ["--method", "lora"], [], tmp_path / "out"
    expected = {
        "non_utf8_jsonl": "train.jsonl:3 is not UTF-8", "huge_label": "train.jsonl:51: label 1000000000",
        "stray_label": "train.jsonl:51: label 7 makes 8 classes", "eval_label_outside": "validation.jsonl:2: label 2 is outside",
        "shuffled_row_line": "data.jsonl:51 has a non-text", "deep_experiment": "nests", "non_utf8_experiment": "exp.yaml:2 is not UTF-8",
        "modules_to_save_number": "modules_to_save must be a list of module names", "name_dotdot": "does not name a folder",
        "output_dir_under_file": "lies under the file",
    }[case]
    if case == "non_utf8_jsonl":
        data = str(tmp_path / "d")
        _lines(tmp_path / "d" / "train.jsonl", [*good[:2], b'{"text": "caf\xe9", "label": 0}', *good[2:]])
    elif case in ("huge_label", "stray_label"):
        data = str(tmp_path / "d")
        label = 10**9 if case == "huge_label" else 7
        _lines(tmp_path / "d" / "train.jsonl", [*good[:50], json.dumps({"text": "x", "label": label}).encode(), *good[50:]])
    elif case == "eval_label_outside":
        data = str(tmp_path / "d")
        _lines(tmp_path / "d" / "train.jsonl", good)
        _lines(tmp_path / "d" / "validation.jsonl", [good[0], json.dumps({"text": "x", "label": 2}).encode()])
    elif case == "shuffled_row_line":  # validation carved out of a single shuffled file: the message names the file line
        data = str(_lines(tmp_path / "data.jsonl", [*good[:50], json.dumps({"text": 5, "label": 0}).encode(), *good[50:]]))
    elif case in ("deep_experiment", "non_utf8_experiment"):
        exp = tmp_path / "exp.yaml"
        exp.write_bytes(b"model: x\ndata: {dataset: caf\xe9}\n" if case == "non_utf8_experiment" else b"runs: " + b"[" * 100_000)
        extra = [str(exp)]
        method = []
    elif case == "modules_to_save_number":
        method += ["--option", "modules_to_save=[123]"]
    elif case == "name_dotdot":
        extra, out = ["--name", ".."], None
    elif case == "output_dir_under_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub"
    argv = ["train", *extra, "--model", str(tiny_model_dir), "--dataset", data, *method, *FAST]
    if out is not None:
        argv += ["--output-dir", str(out)]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("peftlab: error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    (tmp_path / "out").write_text("not a folder")
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(tmp_path / "out"),
                 "--method", "lora", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a file" in err[0]
    assert (tmp_path / "out").read_text() == "not a folder"


def test_name_stays_under_results(tmp_path, monkeypatch):
    from peftlab.lab.experiment import build_experiment

    monkeypatch.chdir(tmp_path)
    spec = {"model": "m", "data": {"dataset": "d"}, "method": "lora"}
    for name in ("../x", "a/../../b", "/etc", "..."):
        exp = build_experiment(spec, overrides={"top": {"name": name}})
        resolved = os.path.realpath(exp.output_dir)
        assert resolved.startswith(str(tmp_path / "results") + os.sep), (name, exp.output_dir)


def test_methods_selects_a_run_by_name_before_its_method():
    """``--methods lora`` keeps the run named lora, not dora and rslora (method lora too);
    ``--methods selective`` names no run, so it keeps every selective run."""
    from types import SimpleNamespace

    from peftlab.errors import WorkbenchError
    from peftlab.lab.cli import _select_runs

    runs = [SimpleNamespace(name=n, method=m) for n, m in
            [("lora", "lora"), ("dora", "lora"), ("rslora", "lora"), ("bitfit", "selective"), ("layernorm", "selective")]]
    assert [r.name for r in _select_runs(runs, ["lora"])] == ["lora"]
    assert [r.name for r in _select_runs(runs, ["dora", "selective"])] == ["dora", "bitfit", "layernorm"]
    with pytest.raises(WorkbenchError, match="match no run"):
        _select_runs(runs, ["ia3"])

"""The workbench answers bad numbers and hostile files with one line (issue 30's adversarial pass, kept
as a table): ``peftlab: error: ...`` on stderr, exit status 2, nothing written, no traceback."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from peftlab.lab.cli import main
from _labutil import tiny_model_dir, toy_data_dir, toy_rows, write_jsonl  # noqa: F401 - fixtures

FAST = ["--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--no-progress", "--cpu", "--method", "lora"]

# (case id, extra command-line flags, words the one error line must contain)
BAD_NUMBERS = [
    ("batch-size-0", ["--batch-size", "0"], "train.batch_size must be at least 1"),
    ("batch-size-negative", ["--batch-size", "-4"], "train.batch_size must be at least 1"),
    ("accumulation-0", ["--gradient-accumulation-steps", "0"], "train.gradient_accumulation_steps must be at least 1"),
    ("eval-batch-size-0", ["--eval-batch-size", "0"], "train.eval_batch_size must be at least 1"),
    ("lr-nan", ["--lr", "nan"], "train.learning_rate must be a positive number"),
    ("lr-negative", ["--lr", "-1"], "train.learning_rate must be a positive number"),
    ("lr-inf", ["--lr", "inf"], "train.learning_rate must be a positive number"),
    ("head-lr-0", ["--head-lr", "0"], "train.head_learning_rate must be a positive number"),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], "train.weight_decay must be zero or positive"),
    ("max-length-negative", ["--max-length", "-5"], "data.max_length must be at least 1"),
    ("max-length-0", ["--max-length", "0"], "data.max_length must be at least 1"),
    ("max-length-beyond-positions", ["--max-length", "1000000"], "data.max_length=1000000 is more than model"),
    ("epochs-0", ["--epochs", "0"], "train.epochs must be a positive number"),
    ("epochs-nan", ["--epochs", "nan"], "train.epochs must be a positive number"),
    ("max-steps-0", ["--max-steps", "0"], "train.max_steps must be at least 1"),
    ("warmup-ratio-5", ["--warmup-ratio", "5"], "train.warmup_ratio is the fraction of steps"),
    ("save-steps-0", ["--save-steps", "0"], "train.save_steps must be at least 1"),
    ("logging-steps-0", ["--logging-steps", "0"], "train.logging_steps must be at least 1"),
    ("seed-negative", ["--seed", "-1"], "train.seed must be between 0 and 2**32 - 1"),
    ("validation-split-1", ["--validation-split", "1"], "data.validation_split must be a fraction"),
    ("max-train-samples-0", ["--max-train-samples", "0"], "data.max_train_samples must be at least 1"),
    ("dev-split-1.5", ["--dev-split", "1.5"], "data.dev_split must be a fraction"),
]


def _one_line_exit_2(capsys, code: int, words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("peftlab: error: ") and words in err[0], err
    return err[0]


@pytest.mark.parametrize(("extra", "words"), [c[1:] for c in BAD_NUMBERS], ids=[c[0] for c in BAD_NUMBERS])
def test_bad_numbers_one_line_exit_2_nothing_written(tmp_path, tiny_model_dir, toy_data_dir, capsys, extra, words):
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out), *FAST, *extra])
    _one_line_exit_2(capsys, code, words)
    assert not out.exists()


@pytest.mark.parametrize(("setting", "words"), [({"lr_scheduler": "cosine_annealing_typo"}, "train.lr_scheduler 'cosine_annealing_typo' is not known"),
                                                ({"batch_size": 0}, "train.batch_size must be at least 1")])
def test_bad_numbers_in_an_experiment_file_and_in_a_sweep(tmp_path, tiny_model_dir, toy_data_dir, capsys, setting, words):
    out = tmp_path / "out"
    for spec in ({"train": setting}, {"sweep": {k: [v] for k, v in setting.items()}, "data": {"dev_split": 0.25}}):
        path = tmp_path / "study.yaml"
        path.write_text(json.dumps({"model": str(tiny_model_dir), "data": {"dataset": str(toy_data_dir), **spec.pop("data", {})},
                                    "output_dir": str(out), "runs": [{"name": "lora", "method": "lora"}], **spec}))
        code = main(["compare", str(path), "--no-progress", "--cpu"])
        _one_line_exit_2(capsys, code, words)
        assert not out.exists()


def _csv_data(tmp_path, text: str):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train.csv").write_text(text, encoding="utf-8")
    (folder / "validation.csv").write_text("text,label\ngood film,1\nbad film,0\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize(("text", "words"), [
    # the quote is never closed: a lenient reader makes the rest of the file one text field
    ('text,label\n"good movie,1\nbad film,0\ngood plot,1\n', "is not valid CSV (unexpected end of data)"),
    ("text,label\ngood movie,1\nbad, very bad film,0\n", "has 3 fields but the header names 2"),
    ("text,label\ngood movie,1\nbad film\n", "has 1 fields but the header names 2"),
])
def test_csv_is_parsed_strictly(tmp_path, tiny_model_dir, capsys, text, words):
    out = tmp_path / "out"
    data = _csv_data(tmp_path, text)
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out), *FAST])
    _one_line_exit_2(capsys, code, words)
    assert not out.exists()


@pytest.mark.parametrize("where", ["in-folder", "as-dataset"])
def test_data_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path, tiny_model_dir, capsys, where):
    folder = tmp_path / "data"
    write_jsonl(folder / "validation.jsonl", toy_rows(4, 1))
    os.mkfifo(folder / "train.jsonl")
    dataset = folder if where == "in-folder" else folder / "train.jsonl"
    out = tmp_path / "out"
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(["train", "--model", str(tiny_model_dir), "--dataset", str(dataset),
                                                                "--output-dir", str(out), *FAST])), daemon=True)
    worker.start()
    worker.join(60)
    if not codes:  # unblock the reader so the thread can end, then fail
        with open(folder / "train.jsonl", "w"):
            pass
        pytest.fail("reading a FIFO data file hangs")
    _one_line_exit_2(capsys, codes[0], "is a named pipe (FIFO), not a regular file")
    assert not out.exists()


def _results(tmp_path, **changes):
    from peftlab.lab.results import RunResult

    record = RunResult(name="lora", method="lora", status="ok", accuracy=0.5).to_dict()
    epoch = changes.pop("epoch", None)
    if epoch is not None:
        record["epochs"] = [{"epoch": 1, **epoch}]
    record.update(changes)
    (tmp_path / "results.json").write_text(json.dumps({"schema": 1, "study": "s", "runs": [record]}))
    return tmp_path


@pytest.mark.parametrize(("changes", "words"), [
    ({"accuracy": "abc"}, "'accuracy' holds str 'abc'"),
    ({"name": None}, "'name' holds NoneType None, expected str"),
    ({"train_seconds": [1]}, "'train_seconds' holds list"),
    ({"epoch": {"accuracy": "x"}}, "'accuracy' holds str 'x'"),
    ({"epochs": [3]}, "'epochs' must be a list of JSON objects"),
    ({"trainable_params": True}, "'trainable_params' holds bool True"),
])
def test_report_on_wrong_typed_fields_answers_with_one_line(tmp_path, capsys, changes, words):
    code = main(["report", str(_results(tmp_path, **changes))])
    line = _one_line_exit_2(capsys, code, words)
    assert "the results file is damaged" in line


def test_generate_on_a_base_that_needs_remote_code_answers_with_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Refused (never run, never asked about on stdin), in one line."""
    import shutil

    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a question on stdin would read EOF here, not hang
    folder = tmp_path / "remote"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(tiny_model_dir / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"model_type": "my-own", "architectures": ["MyModel"],
                                                    "auto_map": {"AutoConfig": "code.MyConfig", "AutoModelForCausalLM": "code.MyModel"}}))
    code = main(["generate", str(folder), "--prompt", "good"])
    _one_line_exit_2(capsys, code, "contains custom code")


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C, as Python delivers it (KeyboardInterrupt in the main thread), when training reaches ``step``."""
    from transformers import TrainerCallback

    from peftlab.lab import runner

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == step:
                raise KeyboardInterrupt

    make = runner._make_trainer

    def with_ctrl_c(*args, **kwargs):
        trainer, timer, stopper = make(*args, **kwargs)
        trainer.add_callback(CtrlC())
        return trainer, timer, stopper

    monkeypatch.setattr(runner, "_make_trainer", with_ctrl_c)


def test_ctrl_c_in_train_one_line_exit_130_result_interrupted_and_resumable(tmp_path, tiny_model_dir, toy_data_dir, capsys,
                                                                             monkeypatch):
    out = tmp_path / "out"
    command = ["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out), *FAST,
               "--epochs", "2", "--save-steps", "2"]
    _interrupt_at_step(monkeypatch, 5)
    code = main(command)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 130
    assert len(err) == 1 and err[0].startswith("peftlab: interrupted (Ctrl-C)"), err
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert result["status"] == "interrupted" and "after step 5" in result["error"] and "--resume" in result["error"]
    monkeypatch.undo()
    assert main([*command, "--resume"]) == 0
    assert json.loads((out / "runs" / "lora" / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "compare"])
def test_real_ctrl_c_prints_one_line_and_no_traceback_from_any_process(tmp_path, tiny_model_dir, toy_data_dir, command):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (compare's worker gets it too)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "peftlab", command, "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir),
            "--output-dir", str(out), "--epochs", "200", "--batch-size", "4", "--save-steps", "3", "--no-progress", "--cpu"]
    args += ["--method", "lora"] if command == "train" else ["--methods", "lora"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = out / "runs" / "lora" / "checkpoints"
    deadline = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*/peftlab-complete*"))) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("peftlab:")]
    assert len(lines) == 1 and "interrupted" in lines[0], stderr[-3000:]
    assert json.loads((out / "runs" / "lora" / "result.json").read_text())["status"] == "interrupted"


def test_retraining_a_finished_run_replaces_its_adapter_only_by_a_folder_swap(tmp_path, tiny_model_dir, toy_data_dir, capsys,
                                                                                monkeypatch):
    """A failure (or kill) while the new adapter is written leaves the finished run's adapter whole."""
    import peftlab.peft_model

    out = tmp_path / "out"
    command = ["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out), *FAST]
    assert main(command) == 0
    adapter = out / "runs" / "lora" / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    save = peftlab.peft_model.PeftModel.save_pretrained

    def save_then_die(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(peftlab.peft_model.PeftModel, "save_pretrained", save_then_die)
    assert main([*command, "--lr", "0.05"]) == 1
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_a_torn_best_on_dev_score_does_not_stop_a_resume(tmp_path):
    from peftlab.lab.callbacks import BestEpoch
    from peftlab.lab.selection import best_path

    (tmp_path / (os.path.basename(best_path(str(tmp_path))) + ".json")).write_text('{"accuracy": 0.7, "lo')
    assert BestEpoch(str(tmp_path)).best is None


def test_best_on_dev_files_are_written_atomically(tmp_path, monkeypatch):
    """Written through peftlab.io's atomic rename: a kill mid-write leaves the previous file whole."""
    import types

    import torch

    from peftlab.lab import callbacks

    written = []
    real = callbacks.atomic_write_text
    monkeypatch.setattr(callbacks, "atomic_write_text", lambda path, text: (written.append(path), real(path, text)))
    best = callbacks.BestEpoch(str(tmp_path))
    model = torch.nn.Linear(2, 2)
    state = types.SimpleNamespace(epoch=1.0)
    best.on_evaluate(None, state, None, model=model, metrics={"eval_accuracy": 0.5, "eval_loss": 1.0})
    assert written == [best.score_path] and json.loads(Path(best.score_path).read_text())["accuracy"] == 0.5
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(best.path), os.path.basename(best.score_path)])


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_second_study_into_a_locked_folder_is_refused_naming_the_first(tmp_path, tiny_model_dir, toy_data_dir, capsys, command):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from peftlab.lab import study; study.lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              env={**os.environ, "PYTHONPATH": str(root / "src")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out), "--no-progress", "--cpu"]
        code = main(["train", *args, "--method", "lora"] if command == "train" else ["compare", *args, "--methods", "lora"])
        line = _one_line_exit_2(capsys, code, f"is in use by another peftlab study (pid {holder.pid}: ")
        assert "study.lock" in line and "pass another --output-dir" in line
        assert os.listdir(out) == []  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_compare_checks_max_length_against_the_model_before_anything_is_written(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    out = tmp_path / "out"
    code = main(["compare", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out),
                 "--methods", "lora", "--max-length", "1000000", "--no-progress", "--cpu"])
    _one_line_exit_2(capsys, code, "data.max_length=1000000 is more than model")
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_while_the_worker_starts_prints_no_traceback(tmp_path, tiny_model_dir, toy_data_dir):
    """Ctrl-C during the worker's imports (its first seconds) ends it quietly as well."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "compare", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir),
                             "--output-dir", str(out), "--methods", "lora", "--no-progress", "--cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    spec = out / "runs" / "lora" / "run.json"
    deadline = time.monotonic() + 120
    while not spec.exists() and time.monotonic() < deadline:  # the worker has just been started
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]

"""The console of ``peftlab train`` / ``compare``: one live line per run on a terminal, plain lines
in a log, and the study line with the time left."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

from peftlab.lab.console import LOG_PARTS, RunLine, duration
from _labutil import ROOT, tiny_model_dir, toy_data_dir  # noqa: F401 - fixtures


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duration():
    assert [duration(s) for s in (0, 42.4, 65, 3599, 3720)] == ["0s", "42s", "1m05s", "59m59s", "1h02m"]


def test_plain_lines_in_a_log_one_per_tenth_with_rate_loss_and_time_left():
    clock, out = Clock(), io.StringIO()
    line = RunLine("lora", total_steps=100, examples_per_step=16, stream=out, live=False, clock=clock)
    for step in range(1, 101):
        clock.now += 0.5  # 2 steps/s = 32 examples/s
        line.step(step, loss=1.0 / step if step % 10 == 0 else None)
    line.finish(100)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == LOG_PARTS + 1  # step 1, then every 10th (finish adds nothing)
    assert lines[0] == "lora: step 1/100 (1%)"  # it started: no rate before a second step
    assert lines[5] == "lora: step 50/100 (50%), 32 examples/s, loss 0.0200, 25s left"
    assert lines[-1] == "lora: step 100/100 (100%), 32 examples/s, loss 0.0100"


def test_a_slow_run_still_logs_every_minute():
    clock, out = Clock(), io.StringIO()
    line = RunLine("full", total_steps=1000, examples_per_step=8, stream=out, live=False, clock=clock)
    for step in range(1, 40):
        clock.now += 20.0  # 40 steps is well under a tenth of the run, but 13 minutes
        line.step(step)
    assert 12 <= len(out.getvalue().splitlines()) <= 14


def test_live_line_is_redrawn_in_place_and_kept_at_the_end():
    clock, out = Clock(), io.StringIO()
    line = RunLine("ia3", total_steps=40, examples_per_step=8, stream=out, live=True, clock=clock)
    for step in range(1, 41):
        clock.now += 0.1  # redrawn at most every LIVE_REFRESH_SECONDS
        line.step(step, loss=0.5)
        if step == 20:
            line.message("ia3: epoch 0.5, eval accuracy 0.8000")  # a plain line clears the live one first
    line.finish(40)
    text = out.getvalue()
    assert "\n" not in text.split("ia3: epoch")[0]  # before the message, only redraws of one line
    assert 8 <= text.count("\r") <= 30  # ~every 0.25 s of 4 s, plus the clears
    assert text.endswith("ia3: step 40/40 (100%), 80 examples/s, loss 0.5000\n")
    assert "\ria3: epoch 0.5, eval accuracy 0.8000\n" in text.replace(" " * 10, "")


def test_study_line_counts_runs_and_scales_the_probe_estimate(tmp_path):
    from peftlab.lab.experiment import build_experiment
    from peftlab.lab.study import Study

    experiment = build_experiment({"name": "s", "model": "m", "data": {"dataset": "d"}, "output_dir": str(tmp_path),
                                   "runs": [{"name": "a", "method": "lora"}, {"name": "b", "method": "ia3"}]})
    study = Study(experiment, [], None, estimates=[100.0, 50.0, 50.0])
    clock = Clock()
    study.clock, study.started = clock, 0.0
    a, b = experiment.runs
    assert study.progress_line(a) == "run 1 of 3: a (lora), 0s elapsed, about 3m20s left (probe estimate)"
    clock.now = 200.0
    study.trained, study.spent = ["a"], [200.0]  # the first run took twice its estimate
    assert study.progress_line(b) == ("run 2 of 3: b (ia3), 3m20s elapsed, about 3m20s left "
                                      "(probe estimate scaled x2 by the runs so far)")
    study.estimates = None  # probing failed: no total, no time left
    assert study.progress_line(b) == "run 2: b (ia3), 3m20s elapsed"


def test_train_on_a_terminal_draws_one_live_line_and_no_trainer_dicts(tmp_path, tiny_model_dir, toy_data_dir):
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "train", "--method", "lora", "--option", "target_modules=[query]",
                             "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--batch-size", "4",
                             "--epochs", "2", "--cpu", "--output-dir", str(tmp_path / "out")],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen[-2000:]
    assert "\rlora: step" in screen and "examples/s" in screen  # drawn in place
    assert "lora: step 32/32 (100%)" in screen  # kept at the end: 2 epochs x 64 rows / 4
    assert "lora: epoch 1, eval accuracy" in screen and "lora: epoch 2, eval accuracy" in screen
    assert screen.index("lora: step 32/32 (100%)") < screen.index("lora: epoch 2, eval accuracy")  # in the order they happen
    assert "{'loss'" not in screen and "{'eval_loss'" not in screen
    assert "Loading weights" not in screen and "it/s]" not in screen  # no third-party bars pushing the lines up


def test_the_callback_clears_its_evaluation_line_after_the_test_pass():
    from types import SimpleNamespace

    from peftlab.lab.console import progress_callback

    out = io.StringIO()
    callback = progress_callback("lora", 8, "dev", live=True, stream=out)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=2, global_step=0, epoch=None)
    callback.on_train_begin(None, state, None)
    for step in (1, 2):
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    kept = out.getvalue()
    assert kept.endswith("\n") and kept.rsplit("\r", 1)[-1].startswith("lora: step 2/2 (100%)")  # the last step stays
    for _ in range(3):  # the held-out test pass after training (Trainer.predict)
        callback.on_prediction_step(None, state, None, eval_dataloader=[0, 1, 2])
    assert "evaluating, batch" in out.getvalue()[len(kept):]
    callback.on_predict(None, state, None)
    after = out.getvalue()[len(kept):]
    assert after.endswith("\r") and after.rstrip("\r").rsplit("\r", 1)[-1].strip() == ""  # blanked: the next print starts clean

"""Interrupted runs resume to the same adapter; a NaN loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peftlab.lab.cli import main
from _labutil import ROOT, tiny_model_dir, toy_data_dir  # noqa: F401 - fixtures

ARGS = ["--method", "lora", "--option", "r=4", "--option", "lora_dropout=0.1", "--option", "target_modules=[query,value]",
        "--epochs", "4", "--batch-size", "2", "--lr", "0.01", "--save-steps", "8", "--no-progress", "--cpu", "--seed", "3"]


def _cmd(model_dir, data_dir, out, *extra):
    return [sys.executable, "-m", "peftlab", "train", "--model", str(model_dir), "--dataset", str(data_dir),
            "--output-dir", str(out), *ARGS, *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def _adapter(out):
    return load_file(out / "runs" / "lora" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, toy_data_dir):
    # Uninterrupted reference run, in this process.
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir),
                 "--output-dir", str(tmp_path / "ref"), *ARGS]) == 0
    reference = _adapter(tmp_path / "ref")

    out = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_model_dir, toy_data_dir, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "lora" / "checkpoints" / "checkpoint-8"
    deadline = time.monotonic() + 180
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]  # interrupted, not finished (128 steps in all)
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert result["status"] == "interrupted" and "--resume" in result["error"]
    stopped = [int(p.name.split("-")[1]) for p in (out / "runs" / "lora" / "checkpoints").iterdir()]
    assert 8 <= max(stopped) < 128
    assert not (out / "runs" / "lora" / "adapter").exists()

    resumed = subprocess.run(_cmd(tiny_model_dir, toy_data_dir, out, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = _adapter(out)
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)
    assert any(k.endswith("lora_B.weight") and final[k].abs().sum() > 0 for k in final)  # it did train
    data = json.loads((out / "results.json").read_text())
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert data["runs"][0]["status"] == "ok"
    assert data["runs"][0]["accuracy"] == ref["runs"][0]["accuracy"]
    # The loss curve survives the restart (it comes from the checkpointed Trainer state).
    assert [s for s, _ in data["runs"][0]["loss_curve"]] == [s for s, _ in ref["runs"][0]["loss_curve"]]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch, capsys):
    from transformers import Trainer

    real = Trainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step >= 5:  # the 6th step's loss is NaN
            return (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan
        return out

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    out = tmp_path / "nan"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out),
                 *ARGS[:-6], "--save-steps", "2", "--no-progress", "--cpu", "--keep-checkpoints"])
    assert code == 1
    err = capsys.readouterr().err
    assert "loss became nan at step 6" in err and "checkpoint-4" in err and "learning_rate" in err
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert result["status"] == "diverged" and result["accuracy"] is None
    checkpoints = sorted(p.name for p in (out / "runs" / "lora" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(out / "runs" / "lora" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "runs" / "lora" / "adapter").exists()
    assert json.loads((out / "results.json").read_text())["runs"][0]["status"] == "diverged"


def test_huge_learning_rate_is_caught(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """No injection: a learning rate of 1e30 drives the weights to inf/NaN within a few steps."""
    out = tmp_path / "huge"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out),
                 "--method", "full", "--epochs", "2", "--batch-size", "8", "--lr", "1e30", "--no-progress", "--cpu"])
    assert code == 1
    assert "NaN/inf" in capsys.readouterr().err or "nan" in (out / "runs" / "full" / "result.json").read_text()
    assert json.loads((out / "runs" / "full" / "result.json").read_text())["status"] == "diverged"


def test_crash_during_training_is_recorded_as_failed_run(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch, capsys):
    """`peftlab train` records an unexpected exception as a failed run (with a report), exit 1."""
    from transformers import Trainer

    real = Trainer.training_step

    def crashing(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("simulated crash in step 3")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crashing)
    out = tmp_path / "crash"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out),
                 *ARGS[:-6], "--no-progress", "--cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "RuntimeError: simulated crash in step 3" in err
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: simulated crash in step 3"
    assert [step for step, _ in result["loss_curve"]] == [] or max(s for s, _ in result["loss_curve"]) <= 2
    assert not (out / "runs" / "lora" / "adapter").exists()
    summary = json.loads((out / "results.json").read_text())
    assert summary["runs"][0]["status"] == "failed"
    assert (out / "report.html").exists()


# ----- kills inside checkpoint writes; divergence without NaN (issue 17) ----------------------------
KILL_ARGS = [*ARGS[:8], "--epochs", "1", "--batch-size", "2", "--lr", "0.01", "--save-steps", "8", "--no-progress", "--cpu",
             "--seed", "3"]
_KILL_DRIVER = """
import os, signal, sys
import safetensors.torch, torch
target, at = os.environ["KILL_IN"], int(os.environ["KILL_AT"])
calls = {"n": 0}
def dying(real):
    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:  # write half a file, then die as SIGKILL would leave it
            with open(path, "wb") as fh:
                fh.write(b"PK\\x03\\x04 half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, path, *args, **kwargs)
    return save
if target == "torch":
    torch.save = dying(torch.save)
else:
    safetensors.torch.save_file = dying(safetensors.torch.save_file)
from peftlab.lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_in, kill_at", [("torch", 6), ("safetensors", 2)])  # checkpoint-16: optimizer.pt (after training_args.bin) / model.safetensors
def test_kill_inside_checkpoint_write_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, toy_data_dir, kill_in, kill_at):
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir)]
    assert main([*argv, "--output-dir", str(tmp_path / "ref"), *KILL_ARGS]) == 0
    reference = _adapter(tmp_path / "ref")

    out = tmp_path / "cut"
    env = {**_env(), "KILL_IN": kill_in, "KILL_AT": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", _KILL_DRIVER, *argv, "--output-dir", str(out), *KILL_ARGS], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = out / "runs" / "lora" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-16", "checkpoint-8"]
    from peftlab.lab.checkpoints import last_checkpoint

    assert last_checkpoint(str(out / "runs" / "lora")) == str(checkpoints / "checkpoint-8")

    resumed = subprocess.run(_cmd(tiny_model_dir, toy_data_dir, out, "--resume")[:-len(ARGS) - 1] + [*KILL_ARGS, "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint-16: its write was cut short" in resumed.stderr
    final = _adapter(out)
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_resume_skips_and_names_torn_checkpoints(tmp_path):
    from peftlab.lab.checkpoints import COMPLETE_MARK, last_checkpoint, torn_checkpoints

    run = tmp_path / "run"
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = run / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE_MARK).write_text(json.dumps({"global_step": step}))
    (run / "checkpoints" / "checkpoint-16").mkdir()
    (run / "checkpoints" / "checkpoint-16" / COMPLETE_MARK).write_text(json.dumps({"global_step": 4}))  # copied mark: not its own
    assert last_checkpoint(str(run)) == str(run / "checkpoints" / "checkpoint-8")
    assert torn_checkpoints(str(run)) == [str(run / "checkpoints" / "checkpoint-16"), str(run / "checkpoints" / "checkpoint-12")]


def test_growing_finite_loss_is_diverged_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """No injection: at lr 1e6 the loss stays finite but grows by orders of magnitude (the divergence rule)."""
    out = tmp_path / "big-lr"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out),
                 *ARGS[:8], "--epochs", "2", "--batch-size", "2", "--lr", "1e6", "--save-steps", "1", "--keep-checkpoints",
                 "--no-progress", "--cpu"])
    assert code == 1
    result = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert result["status"] == "diverged", result["error"]
    assert "divergence rule" in result["error"]  # finite throughout: the growth rule, not the NaN check, stopped it
    assert all(math.isfinite(loss) for _, loss in result["loss_curve"])
    assert not (out / "runs" / "lora" / "adapter").exists()
    from peftlab.lab.checkpoints import last_checkpoint

    kept = last_checkpoint(str(out / "runs" / "lora"))
    assert kept is not None and os.path.basename(kept) in result["error"]


def test_divergence_rule():
    from peftlab.lab.callbacks import divergence

    assert divergence(0.7, 0.69) is None and divergence(60.0, 0.69) is None  # floor of 1: 100x max(first, 1)
    assert "divergence rule" in divergence(101.0, 0.69)
    assert divergence(1e-2, 1e-6) is None  # a tiny first loss does not make noise look like divergence
    assert divergence(900.0, 10.0) is None and divergence(1001.0, 10.0) is not None


def _transformers_before(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version(version)


# On transformers 5.23 (the oldest claimed) resuming from the step-12 checkpoint of the every-4-steps run ends
# away from the uninterrupted adapter; 5.25 is exact. Not yet explained: recorded as a known failure there.
_OLD_RESUME = pytest.mark.xfail(_transformers_before("5.25"), reason="resume from a mid-epoch checkpoint is not exact on transformers < 5.25 (open)", strict=False)


@pytest.mark.parametrize("save", [pytest.param(["--save-steps", "4"], marks=_OLD_RESUME), []], ids=["every-4-steps", "every-epoch"])
def test_resume_from_every_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch, save):
    """Epoch boundaries included: a checkpoint taken at an epoch's last step comes before that epoch's
    evaluation, which must not change what training does next (dropout on, so the random state matters)."""
    import shutil

    from peftlab.lab import runner

    monkeypatch.setattr(runner, "KEPT_CHECKPOINTS", None)  # keep every checkpoint of the reference run
    args = ["--method", "lora", "--option", "r=4", "--option", "lora_dropout=0.1", "--option", "target_modules=[query,value]",
            "--epochs", "3", "--batch-size", "8", "--lr", "0.01", "--no-progress", "--cpu", "--seed", "3", "--keep-checkpoints", *save]

    def train(out, *extra):
        assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(out), *args,
                     *extra]) == 0

    train(tmp_path / "ref")
    reference = _adapter(tmp_path / "ref")
    checkpoints = sorted((tmp_path / "ref" / "runs" / "lora" / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    steps = [int(p.name.split("-")[1]) for p in checkpoints]
    assert 8 in steps and 16 in steps  # 64 rows / 8 = 8 steps per epoch: the epoch boundaries are among them
    for checkpoint in checkpoints[:-1]:
        out = tmp_path / f"from-{checkpoint.name}"
        shutil.copytree(tmp_path / "ref", out)
        kept = out / "runs" / "lora"
        shutil.rmtree(kept / "adapter")
        for later in (kept / "checkpoints").iterdir():
            if int(later.name.split("-")[1]) > int(checkpoint.name.split("-")[1]):
                shutil.rmtree(later)
        train(out, "--resume")
        resumed = _adapter(out)
        for key in reference:  # same operations in the same order on the same CPU: bit for bit
            assert torch.equal(resumed[key], reference[key]), (checkpoint.name, key)

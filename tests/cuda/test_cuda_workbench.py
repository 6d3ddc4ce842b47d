"""The workbench on CUDA: ``peftlab train`` without ``--cpu`` trains on the GPU (fp32 and bf16 autocast)
and records the card's name and its peak CUDA memory (peftlab.lab.runner, measure, budget's GPU branches).

The dry run on the CPU passes ``--cpu``, the one difference."""

from __future__ import annotations

import json

import pytest
import torch

from _cuda import device  # noqa: F401  (the fixture)
from _labutil import tiny_model_dir, toy_data_dir  # noqa: F401  (fixtures)
from peftlab.lab import budget, measure
from peftlab.lab.cli import main

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_train_runs_on_the_gpu_and_records_it(device, tmp_path, tiny_model_dir, toy_data_dir, capsys, bf16):  # noqa: F811
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--output-dir", str(tmp_path / "out"),
            "--method", "lora", "--option", "r=4", "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--no-progress"]
    args += ["--bf16"] if bf16 else []
    args += ["--cpu"] if device.type == "cpu" else []
    assert main(args) == 0, capsys.readouterr().err
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["epochs"][-1]["eval_loss"] > 0
    if device.type == "cuda":
        assert run["environment"]["device"] == torch.cuda.get_device_name(0)
        assert run["cuda_peak_mb"] > 0 and measure.cuda_peak_mb() >= run["cuda_peak_mb"] * 0.99
    else:
        assert run["cuda_peak_mb"] is None


def test_budget_sync_waits_for_the_device(device):
    x = torch.randn(256, 256, device=device)
    y = x @ x
    budget._sync(device)  # on CUDA: torch.cuda.synchronize; a no-op elsewhere
    assert torch.isfinite(y).all()


def test_compare_dry_run_probes_steps_on_the_gpu(device, tmp_path, tiny_model_dir, toy_data_dir, capsys):  # noqa: F811
    """``compare --dry-run`` times a few steps per run (budget.probe) on the GPU unless --cpu is given."""
    args = ["compare", "--methods", "full,lora", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir),
            "--output-dir", str(tmp_path / "cmp"), "--dry-run", "--epochs", "1", "--batch-size", "8"]
    args += ["--cpu"] if device.type == "cpu" else []
    assert main(args) == 0, capsys.readouterr().err
    plan = capsys.readouterr().out
    assert "full" in plan and "lora" in plan and "~" in plan

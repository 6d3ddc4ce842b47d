"""Two CPU processes (torchrun, gloo) train the same adapter as one process with the doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _labutil import ROOT, tiny_model_dir, toy_data_dir  # noqa: F401 - fixtures


@pytest.mark.slow
def test_two_process_gloo_run_equals_single_process(tmp_path, tiny_model_dir, toy_data_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["train", "--model", str(tiny_model_dir), "--dataset", str(toy_data_dir), "--method", "lora",
              "--option", "r=4", "--option", "target_modules=[query,value]", "--epochs", "2", "--lr", "0.01",
              "--no-progress", "--cpu", "--seed", "1"]
    single = subprocess.run([sys.executable, "-m", "peftlab", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "-m", "peftlab", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one = load_file(tmp_path / "one" / "runs" / "lora" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "runs" / "lora" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    assert any(k.endswith("lora_B.weight") and one[k].abs().sum() > 0 for k in one)  # it trained
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())["runs"][0]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())["runs"][0]
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["accuracy"] == r1["accuracy"]
    assert abs(r2["eval_loss"] - r1["eval_loss"]) < 1e-4
    assert len(r2["loss_curve"]) == len(r1["loss_curve"])  # same number of optimizer steps

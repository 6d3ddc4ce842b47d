"""FSDP (torch's ``fully_shard``) with LoRA on 2 gloo CPU processes gives the single-process adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_fully_shard_on_two_gloo_processes_equals_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                          str(WORKER), str(tmp_path / "two.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    single, sharded = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert single.keys() == sharded.keys()
    assert any("lora_B" in k and single[k].abs().sum() > 0 for k in single)  # it trained
    for key in single:
        # Only the order of the gradient reduction differs: a few float32 ulps of values of size <= 1.
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-6)

"""Shared set-up of the CUDA tests (tests/cuda/): the device, fp32 kept fp32, the method tables importable.

Each test file imports the ``device`` fixture from here. Every test here is marked ``cuda``; tests/conftest.py skips them where torch sees no CUDA device,
and ``PEFTLAB_TEST_DEVICE=cpu`` runs them on the CPU instead (a dry run: tools/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import cuda_test_device

# The contract tables (tests/methods/test_<method>.py) and the workbench fixtures (tests/lab/_labutil.py)
# import their helpers as top-level modules.
METHODS_DIR = str(Path(__file__).resolve().parents[1] / "methods")
LAB_DIR = str(Path(__file__).resolve().parents[1] / "lab")
for folder in (METHODS_DIR, LAB_DIR):
    if folder not in sys.path:
        sys.path.insert(0, folder)


@pytest.fixture
def device() -> torch.device:
    """CUDA (or the CPU in a dry run), with TF32 off for the test.

    The tolerances are derived for fp32 arithmetic (24-bit significands); cuDNN convolutions use
    TF32 (10-bit) by default on Ampere and later, which would turn fp32 checks into TF32 checks.
    """
    dev = cuda_test_device()
    if dev.type != "cuda":
        yield dev
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield dev
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        torch.cuda.synchronize()


def on(device: torch.device, inputs: dict) -> dict:
    """``inputs`` with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

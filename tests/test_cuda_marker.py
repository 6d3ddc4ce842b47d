"""The ``cuda`` marker: without a GPU the CUDA tests are skipped with the reason, and
``PEFTLAB_TEST_DEVICE=cpu`` runs them on the CPU instead (the dry run of tools/gpu_check.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ONE = "tests/cuda/test_cuda_workbench.py::test_budget_sync_waits_for_the_device"


def _pytest(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PEFTLAB_TEST_DEVICE"}
    env.update({"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", ONE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the cuda tests run rather than skip")
def test_cuda_tests_skip_without_a_gpu_and_dry_run_on_the_cpu():
    skipped = _pytest({})
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "needs CUDA: torch.cuda.is_available() is False" in skipped.stdout
    dry = _pytest({"PEFTLAB_TEST_DEVICE": "cpu"})
    assert dry.returncode == 0 and "1 passed" in dry.stdout, dry.stdout[-2000:]

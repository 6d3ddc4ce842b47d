"""The suite without Hugging Face peft (PEFTLAB_TEST_HIDE=peft, see tests/conftest.py): every module
collects, peft comparisons skip with a reason, and the peft-independent tests that catch wrong
gradients or a wrong adapter placement still run (a planted bug in DoRA's norm or IA3's placement
once survived because their modules did not even collect without peft)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pytest_without_peft(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTLAB_TEST_HIDE": "peft", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_module_collects_without_peft():
    out = _pytest_without_peft("--collect-only", "tests")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.strip().splitlines()[-1], out.stdout[-4000:]


@pytest.mark.slow
def test_tests_that_catch_wrong_gradients_and_placement_run_without_peft():
    bite = ["tests/methods/test_dora.py::test_norm_is_constant_in_backward", "tests/methods/test_ia3.py::test_hand_computed_scaling",
            "tests/methods/test_ia3.py::test_gpt2_defaults_scale_conv1d_output_and_input_by_hand"]
    out = _pytest_without_peft("-rs", *bite, "tests/methods/test_dora.py::test_gradients_match_peft")
    assert out.returncode == 0, out.stdout[-4000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert f"{len(bite)} passed, 1 skipped" in summary, out.stdout[-4000:]
    assert "compares with Hugging Face peft, the test oracle, which is not importable" in out.stdout or "could not import 'peft'" in out.stdout

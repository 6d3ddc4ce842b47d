"""Trainer support whatever the import order, with or without peft installed, and trl's peft_config.

Each scenario runs in a fresh process (tests/integrations/trainer_scenarios.py): which modules are
imported first, and whether peft exists, are properties of a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "trainer_scenarios.py")


def run(scenario: str, tmp_path, no_peft: bool = False) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, SCRIPT, scenario, str(tmp_path / "out"), *(["--no-peft"] if no_peft else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result.pop("peft_importable") is not no_peft
    return result


@pytest.mark.parametrize("scenario", ["trainer_imported_first", "model_built_first"])
def test_the_trainer_saves_adapters_without_an_opt_in_call(scenario, tmp_path):
    assert run(scenario, tmp_path) == {"adapter": True, "full": False}


@pytest.mark.slow
def test_the_qlora_recipe_trains_without_an_opt_in_call(tmp_path):
    pytest.importorskip("bitsandbytes")
    assert run("qlora_without_opt_in", tmp_path) == {"adapter": True, "full": False}


def test_disabled_support_stays_off(tmp_path):
    assert run("support_disabled", tmp_path) == {"adapter": False, "full": True}


@pytest.mark.slow
@pytest.mark.parametrize("no_peft", [False, True], ids=["with-peft", "without-peft"])
def test_sft_trainer_takes_a_peftlab_config(no_peft, tmp_path):
    pytest.importorskip("trl")
    result = run("sft_config_trains", tmp_path, no_peft)
    assert result == {"peftlab_model": True, "moved": result["tensors"], "tensors": 4, "adapter": True, "full": False}


@pytest.mark.slow
@pytest.mark.parametrize("no_peft", [False, True], ids=["with-peft", "without-peft"])
def test_dpo_trainer_takes_a_peftlab_config(no_peft, tmp_path):
    pytest.importorskip("trl")
    result = run("dpo_trains", tmp_path, no_peft)
    assert result == {"peftlab_model": True, "moved": 8, "tensors": 8, "adapter": True, "full": False}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["dpo_lm_head_opt_in_first", "dpo_lm_head_trl_first"])
@pytest.mark.parametrize("no_peft", [False, True], ids=["with-peft", "without-peft"])
def test_an_adapter_on_lm_head_is_refused_whatever_the_import_order(scenario, no_peft, tmp_path):
    pytest.importorskip("trl")
    assert run(scenario, tmp_path, no_peft) == {"refused": True}

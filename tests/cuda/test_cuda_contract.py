"""Every method's contract rows (tests/methods/) on CUDA: the same checks, the model and inputs on the device.

The tables are read from the method test modules themselves, so a row added there runs here too.
Layer methods: identity at init, merge / unmerge (where the method's own table checks it),
save / load, only adapter parameters train, and both directions of peft parity. Prompt methods:
save / load and training (their generation and forward-parity checks build CPU tensors of their own).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from _cuda import METHODS_DIR, device  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cuda


def _tables() -> tuple[dict, dict]:
    import _contract
    import _prompt_contract

    layer, prompt = {}, {}
    for path in sorted(Path(METHODS_DIR).glob("test_*.py")):
        module = importlib.import_module(path.stem)
        for row, case in getattr(module, "CASES", {}).items():
            key = f"{path.stem[len('test_'):]}/{row}"
            if isinstance(case, _contract.Case):
                layer[key] = (case, hasattr(module, "test_merged_equals_unmerged"))
            elif isinstance(case, _prompt_contract.PromptCase):
                prompt[key] = case
    return layer, prompt


LAYER, PROMPT = _tables()
PEFT_ROWS = [k for k, (case, _) in LAYER.items() if case.theirs is not None]
MERGE_ROWS = [k for k, (_, merges) in LAYER.items() if merges]


def test_tables_were_found():
    """Guards the discovery above: LoRA's, DoRA's and prompt tuning's rows are there, and some rows merge."""
    methods = {k.split("/")[0] for k in [*LAYER, *PROMPT]}
    assert {"lora", "dora", "ia3", "loha", "lokr", "adalora", "bottleneck", "prompt_tuning", "prefix_tuning", "p_tuning"} <= methods
    assert MERGE_ROWS and PEFT_ROWS


@pytest.mark.parametrize("row", list(LAYER))
def test_identity_at_init(row, device):
    from _contract import check_identity_at_init

    check_identity_at_init(LAYER[row][0], device)


@pytest.mark.parametrize("row", MERGE_ROWS)
def test_merged_equals_unmerged(row, device):
    from _contract import check_merge_unmerge

    check_merge_unmerge(LAYER[row][0], device)


@pytest.mark.parametrize("row", list(LAYER))
def test_save_load_roundtrip(row, device, tmp_path):
    from _contract import check_save_load_roundtrip

    check_save_load_roundtrip(LAYER[row][0], tmp_path, device)


@pytest.mark.parametrize("row", list(LAYER))
def test_only_adapter_parameters_change(row, device):
    from _contract import check_only_adapter_parameters_change

    check_only_adapter_parameters_change(LAYER[row][0], device)


@pytest.mark.slow  # the peft oracle's import and models; --quick leaves the parity rows out
@pytest.mark.parametrize("row", PEFT_ROWS)
def test_peft_checkpoint_loads_in_peftlab(row, device, tmp_path):
    pytest.importorskip("peft")
    from _contract import check_peft_to_peftlab

    check_peft_to_peftlab(LAYER[row][0], tmp_path, device)


@pytest.mark.slow  # the peft oracle's import and models; --quick leaves the parity rows out
@pytest.mark.parametrize("row", PEFT_ROWS)
def test_peftlab_checkpoint_loads_in_peft(row, device, tmp_path):
    pytest.importorskip("peft")
    from _contract import check_peftlab_to_peft

    check_peftlab_to_peft(LAYER[row][0], tmp_path, device)


@pytest.mark.parametrize("row", list(PROMPT))
def test_prompt_save_load_roundtrip(row, device, tmp_path):
    from _prompt_contract import check_save_load_roundtrip

    check_save_load_roundtrip(PROMPT[row], tmp_path, device)


@pytest.mark.parametrize("row", list(PROMPT))
def test_prompt_only_prompt_and_head_train(row, device):
    from _prompt_contract import check_only_prompt_and_head_train

    check_only_prompt_and_head_train(PROMPT[row], device)

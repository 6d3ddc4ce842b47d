"""Generic checks every layer-adapter method must pass; each tests/methods/test_<method>.py runs
them over its own table of (tiny model x config) rows.

A row is ``Case(build, inputs, ours, theirs)``: a base-model builder, an input maker and two
config factories, ``ours(identity: bool)`` for peftlab and ``theirs()`` for Hugging Face peft
(random, non-identity init) or None when peft has no counterpart.

Each check takes an optional ``device`` (default: the CPU, where models are built); tests/cuda/
runs the same checks on CUDA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import peftlab
from conftest import main_output, peft_at_least, peft_oracle


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    ours: Callable[[bool], Any]
    theirs: Callable[[], Any] | None = None
    # Perturb trainable tensors after building (e.g. DoRA's magnitude, which init sets to "no-op").
    perturb: bool = False
    # The oldest peft that computes this row as the oracle does (an older one is skipped, with the reason).
    peft_min: str | None = None
    # Frozen peft parameters peftlab keeps as buffers (AdaLoRA's ranknum): left out of peft's total.


def conv_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 3, 6, 6, generator=g), "ids": torch.randint(0, 20, (2, 4), generator=g)}


def inputs_on(case: Case, device: torch.device | None) -> dict:
    """The case's inputs, moved to ``device`` when one is given."""
    inputs = case.inputs()
    return inputs if device is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def built_on(case: Case, device: torch.device | None) -> nn.Module:
    base = case.build()
    return base if device is None else base.to(device)


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def perturb_trainable(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g).to(param.device) * 0.1)


def base_and_model(case: Case, identity: bool, seed: int = 1, device: torch.device | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = built_on(case, device)
    torch.manual_seed(seed)
    model = peftlab.get_peft_model(copy.deepcopy(base), case.ours(identity))
    if case.perturb and not identity:
        perturb_trainable(model)
    return base, model


def check_identity_at_init(case: Case, device: torch.device | None = None) -> None:
    base, model = base_and_model(case, identity=True, device=device)
    inputs = inputs_on(case, device)
    torch.testing.assert_close(run(model, inputs), run(base, inputs), atol=1e-6, rtol=0)


def check_merge_unmerge(case: Case, device: torch.device | None = None) -> None:
    base, model = base_and_model(case, identity=False, device=device)
    inputs = inputs_on(case, device)
    unmerged = run(model, inputs)
    assert not torch.allclose(unmerged, run(base, inputs), atol=1e-4), "random init must change the output"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(run(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)


def check_save_load_roundtrip(case: Case, tmp_path, device: torch.device | None = None) -> None:
    base, model = base_and_model(case, identity=False, device=device)
    inputs = inputs_on(case, device)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-6, rtol=1e-6)


def check_only_adapter_parameters_change(case: Case, device: torch.device | None = None) -> None:
    base, model = base_and_model(case, identity=True, device=device)
    inputs = inputs_on(case, device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n + "." for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):  # two steps: a factor that starts at zero moves the others on step two
        loss = main_output(model(**inputs)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert any(".default." in n + "." and ".modules_to_save." not in n for n in changed)


def check_peft_to_peftlab(case: Case, tmp_path, device: torch.device | None = None) -> None:
    peft = _oracle_for(case)

    torch.manual_seed(0)
    base = built_on(case, device)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), case.theirs())
    if case.perturb:
        perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = inputs_on(case, device)
    expected = run(theirs, inputs)
    assert not torch.allclose(expected, run(base, inputs), atol=1e-4), "adapter must change the output"
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=1e-5)


def _oracle_for(case: Case):
    peft = peft_oracle()
    if case.peft_min is not None and peft_at_least(case.peft_min) is None:
        pytest.skip(f"peft {peft.__version__} computes this row differently; the oracle for it is peft >= {case.peft_min}")
    return peft


def check_peftlab_to_peft(case: Case, tmp_path, device: torch.device | None = None) -> None:
    peft = _oracle_for(case)

    base, ours = base_and_model(case, identity=False, seed=2, device=device)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = inputs_on(case, device)
    expected = run(ours, inputs)
    assert not torch.allclose(expected, run(base, inputs), atol=1e-4)
    torch.testing.assert_close(run(theirs, inputs), expected, atol=1e-5, rtol=1e-5)


def check_same_trainable_count_as_peft(case: Case) -> None:
    peft = peft_oracle()

    torch.manual_seed(0)
    base = case.build()
    ours = peftlab.get_peft_model(copy.deepcopy(base), case.ours(True))
    theirs = peft.get_peft_model(copy.deepcopy(base), case.theirs())
    trainable, total = theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters() == (trainable, total)


def contract_tests(cases: dict[str, Case]):
    """Build the module-level test functions for a table of cases (pytest collects the returned dict)."""
    import pytest

    ids = list(cases)
    peft_ids = [k for k in ids if cases[k].theirs is not None]

    @pytest.mark.parametrize("case", ids)
    def test_identity_at_init(case):
        check_identity_at_init(cases[case])

    @pytest.mark.parametrize("case", ids)
    def test_merged_equals_unmerged(case):
        check_merge_unmerge(cases[case])

    @pytest.mark.parametrize("case", ids)
    def test_save_load_roundtrip(case, tmp_path):
        check_save_load_roundtrip(cases[case], tmp_path)

    @pytest.mark.parametrize("case", ids)
    def test_only_adapter_parameters_change(case):
        check_only_adapter_parameters_change(cases[case])

    @pytest.mark.parametrize("case", peft_ids)
    def test_peft_checkpoint_loads_in_peftlab(case, tmp_path):
        pytest.importorskip("peft")
        check_peft_to_peftlab(cases[case], tmp_path)

    @pytest.mark.parametrize("case", peft_ids)
    def test_peftlab_checkpoint_loads_in_peft(case, tmp_path):
        pytest.importorskip("peft")
        check_peftlab_to_peft(cases[case], tmp_path)

    @pytest.mark.parametrize("case", peft_ids)
    def test_same_trainable_parameter_count_as_peft(case):
        pytest.importorskip("peft")
        check_same_trainable_count_as_peft(cases[case])

    return {name: fn for name, fn in locals().items() if name.startswith("test_")}

"""Property-based tests: every bad input ends in peftlab's own clear error, never a crash deep
inside torch, safetensors or re, and never a silently wrong model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import peftlab
from peftlab import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.targeting import name_matches
from conftest import tiny_bert_cls

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
lora_keys = st.sampled_from(
    ["r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "init_lora_weights", "rank_pattern",
     "alpha_pattern", "layers_to_transform", "task_type", "modules_to_save", "fan_in_fan_out", "exclude_modules",
     "use_dora", "something_else"]
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FAST
@given(st.dictionaries(lora_keys, json_values, max_size=6))
def test_config_parsing_fails_only_with_our_errors(data):
    data = {"peft_type": "LORA", **data}
    try:
        config = PeftConfig.from_dict(data)
    except peftlab.PeftlabError:
        return
    except UserWarning:
        return
    assert isinstance(config, LoraConfig)
    assert config.r > 0
    # a parsed config survives a JSON round trip unchanged
    again = PeftConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@FAST
@given(st.one_of(st.text(max_size=12), st.lists(st.text(max_size=8), max_size=4)))
def test_target_matching_never_crashes(targets):
    model = tiny_bert_cls()
    names_before = [n for n, _ in model.named_modules()]
    try:
        wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    except peftlab.PeftlabError:
        assert [n for n, _ in model.named_modules()] == names_before
        return
    adapted = [n for n, m in wrapped.get_base_model().named_modules() if hasattr(m, "adapters")]
    assert adapted and all(name_matches(n, targets) for n in adapted)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False)).save_pretrained(folder)
    return folder


@FAST
@given(cut=st.integers(0, 4000), garbage=st.binary(max_size=64))
def test_truncated_or_garbage_weights_give_checkpoint_error(saved_adapter, tmp_path_factory, cut, garbage):
    folder = tmp_path_factory.mktemp("broken")
    (folder / "adapter_config.json").write_text((saved_adapter / "adapter_config.json").read_text())
    data = (saved_adapter / "adapter_model.safetensors").read_bytes()
    broken = data[: min(cut, len(data) - 1)] + garbage
    assume(len(broken) != len(data))  # same length = valid file with changed numbers, not damage
    (folder / "adapter_model.safetensors").write_bytes(broken)
    model = tiny_bert_cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(peftlab.PeftlabError):
        PeftModel.from_pretrained(model, folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@FAST
@given(st.dictionaries(st.sampled_from(["r", "target_modules", "lora_alpha", "peft_type", "bias"]), json_values, max_size=4))
def test_mismatched_config_files(saved_adapter, tmp_path_factory, overrides):
    folder = tmp_path_factory.mktemp("mismatch")
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config.update(overrides)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((saved_adapter / "adapter_model.safetensors").read_bytes())
    model = tiny_bert_cls()
    try:
        loaded = PeftModel.from_pretrained(model, folder)
    except peftlab.PeftlabError:
        return
    # if it loads, the config really fits the weights: same keys and shapes as the original
    reference = PeftModel.from_pretrained(tiny_bert_cls(), saved_adapter)
    assert {k: v.shape for k, v in peftlab.get_peft_model_state_dict(loaded).items()} == {
        k: v.shape for k, v in peftlab.get_peft_model_state_dict(reference).items()
    }

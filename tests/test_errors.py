"""Bad input gets our own clear error, and leaves the model and files untouched."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab import IA3Config, LoraConfig, PeftModel, get_peft_model
from conftest import tiny_bert_cls, tiny_llama


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    params, types = snap
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for name, (value, grad) in params.items():
        assert torch.equal(now[name].detach(), value) and now[name].requires_grad == grad
    assert [type(m) for m in model.modules()] == types


def test_unknown_target_lists_candidates():
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(peftlab.TargetModuleError) as err:
        get_peft_model(model, LoraConfig(target_modules=["query", "qeury"]))
    message = str(err.value)
    assert "qeury" in message and "query" in message and "value" in message
    assert_unchanged(model, snap)


def test_regex_matching_nothing():
    with pytest.raises(peftlab.TargetModuleError, match="selects no module"):
        get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=r".*nothing"))


def test_unsupported_layer_type_leaves_model_untouched():
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(peftlab.TargetModuleError, match="cannot adapt"):
        get_peft_model(model, LoraConfig(target_modules=["query", "LayerNorm"]))
    assert_unchanged(model, snap)


def test_unknown_architecture_without_targets():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(peftlab.TargetModuleError, match="set target_modules"):
        get_peft_model(net, LoraConfig())


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=-2), dict(r=2.5), dict(lora_dropout=1.5), dict(bias="some"), dict(init_lora_weights="pissa")])
def test_invalid_lora_config(kwargs):
    with pytest.raises(peftlab.PeftConfigError):
        LoraConfig(**kwargs)


def test_invalid_task_type():
    with pytest.raises(peftlab.PeftConfigError, match="task_type"):
        LoraConfig(task_type="CLASSIFY")


def test_checkpoint_shape_mismatch_leaves_model_untouched(tmp_path):
    torch.manual_seed(0)
    get_peft_model(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(peftlab.CheckpointError, match="shape mismatches"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)


def test_checkpoint_for_other_architecture(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(peftlab.PeftlabError):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)


def test_checkpoint_with_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_bert_cls(), LoraConfig(r=4)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.CheckpointError, match="missing"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)


def test_load_adapter_failure_keeps_existing_adapters(tmp_path):
    get_peft_model(tiny_bert_cls(), LoraConfig(r=4, target_modules=["key"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2))
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(peftlab.CheckpointError, match="damaged"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert {n for n, _ in model.named_parameters()} == before
    assert list(model.peft_config) == ["default"]


def test_pickle_weights_need_explicit_permission(tmp_path):
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(peftlab.CheckpointError, match="allow_pickle=True"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, allow_pickle=True)


def test_missing_folder(tmp_path):
    with pytest.raises(peftlab.CheckpointError, match="does not exist"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "nope")


def test_config_type_checks_and_unknown_keys(tmp_path):
    with pytest.raises(peftlab.PeftConfigError, match="'r'"):
        peftlab.PeftConfig.from_dict({"peft_type": "LORA", "r": "8"})
    with pytest.warns(UserWarning, match="unknown config keys"):
        cfg = peftlab.PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "shiny_new_option": 1})
    assert isinstance(cfg, LoraConfig) and cfg.r == 4
    with pytest.raises(peftlab.PeftConfigError, match="loftq_config"):
        peftlab.PeftConfig.from_dict({"peft_type": "LORA", "loftq_config": {"loftq_bits": 4}})
    with pytest.raises(peftlab.PeftConfigError, match="unknown peft_type"):
        peftlab.PeftConfig.from_dict({"peft_type": "MAGIC"})


def test_adapter_name_rules():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2))
    with pytest.raises(peftlab.AdapterStateError, match="exists already"):
        model.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(peftlab.AdapterStateError, match="different methods"):
        model.add_adapter("x", IA3Config())
    with pytest.raises(peftlab.AdapterStateError, match="invalid adapter name"):
        model.add_adapter("a.b", LoraConfig(r=2))
    with pytest.raises(peftlab.AdapterStateError, match="no adapter named"):
        model.set_adapter("missing")

"""Save/load round-trips and the on-disk layout."""

from __future__ import annotations

import copy
import json

import torch

from peftlab import IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from conftest import main_output, text_inputs, tiny_bert_cls, tiny_llama


def test_round_trip_multiple_adapters(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and config["r"] == 4
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    inputs = text_inputs()
    with torch.no_grad():
        for name in ("default", "second"):
            model.set_adapter(name)
            loaded.set_adapter(name)
            torch.testing.assert_close(main_output(loaded(**inputs)), main_output(model(**inputs)))
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference: frozen"


def test_is_trainable_and_key_layout(tmp_path):
    model = get_peft_model(tiny_bert_cls(), IA3Config(task_type="SEQ_CLS"))
    keys = set(get_peft_model_state_dict(model))
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l" in keys
    assert "base_model.model.classifier.weight" in keys
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad}


def test_state_dict_functions_round_trip():
    torch.manual_seed(0)
    a = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False, bias="all"))
    b = get_peft_model(copy.deepcopy(a.get_base_model()).__class__(a.get_base_model().config), LoraConfig(r=2, bias="all"))
    state = get_peft_model_state_dict(a)
    set_peft_model_state_dict(b, state)
    for key, value in get_peft_model_state_dict(b).items():
        torch.testing.assert_close(value, state[key])


def test_save_is_atomic_when_writer_fails(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    try:
        model.save_pretrained(tmp_path)
    except OSError:
        pass
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)

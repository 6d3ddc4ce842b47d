"""Save/load round-trips and the on-disk layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftlab import IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from conftest import main_output, text_inputs, tiny_bert_cls, tiny_distilbert, tiny_llama


def test_round_trip_multiple_adapters(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and config["r"] == 4
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    inputs = text_inputs()
    with torch.no_grad():
        for name in ("default", "second"):
            model.set_adapter(name)
            loaded.set_adapter(name, inference_mode=True)  # as peft: plain set_adapter would make it trainable
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

    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}  # the tensors are live views
    set_peft_model_state_dict(model, {k: v + 1 for k, v in state.items()})  # the failed save would change the file

    import safetensors.torch

    calls = []

    def broken_save(tensors, path, metadata=None):
        calls.append(path)
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert len(calls) == 1, "the failing writer was never reached"
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)  # the first save's values


# ----- reading and refusing files: what each path reads, and what each error says ---------------
import re  # noqa: E402

from safetensors import safe_open  # noqa: E402

import peftlab  # noqa: E402
from peftlab.checkpoint import load_adapter, load_adapter_weights  # noqa: E402
from peftlab.errors import CheckpointError  # noqa: E402


def _saved_lora(folder):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False, target_modules=["query", "value"]))
    model.save_pretrained(folder)
    return model


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_both_readers_take_folders_subfolders_and_pickles_only_when_allowed(tmp_path):
    sub = tmp_path / "sub"
    expected = get_peft_model_state_dict(_saved_lora(sub))
    with safe_open(sub / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and peft expect of the file
    _assert_same(load_adapter_weights(sub), expected)
    _assert_same(load_adapter_weights(tmp_path, subfolder="sub"), expected)
    config, weights = load_adapter(tmp_path, subfolder="sub")
    assert config.r == 2
    _assert_same(weights, expected)

    torch.save(expected, sub / "adapter_model.bin")
    (sub / "adapter_model.safetensors").unlink()
    for read in (load_adapter_weights, lambda *a: load_adapter(*a)[1]):
        with pytest.raises(CheckpointError, match=r"adapter_model\.bin is a pickle file, .* Pass allow_pickle=True only if"):
            read(tmp_path, "sub")
        _assert_same(read(tmp_path, "sub", True), expected)

    (sub / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors found for adapter '.*' \(subfolder 'sub'\)\.$"):
        load_adapter_weights(tmp_path, "sub")
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors found for adapter '.*sub'\.$"):
        load_adapter(tmp_path, "sub")
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors found for adapter '[^(]*'\.$"):
        load_adapter_weights(sub)  # no subfolder: none named


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(2)], "does not hold a mapping of tensor names to tensors"),
        ({1: torch.zeros(2)}, "does not hold a mapping of tensor names to tensors"),
        ({"a": [1, 2]}, "does not hold a mapping of tensor names to tensors"),
    ],
)
def test_pickles_must_be_name_to_tensor_mappings(tmp_path, content, message):
    _saved_lora(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(content, tmp_path / "adapter_model.bin")
    for read in (load_adapter_weights, lambda *a: load_adapter(*a)[1]):
        with pytest.raises(CheckpointError, match=rf"adapter_model\.bin {message}"):
            read(tmp_path, None, True)


def test_hostile_pickle_never_runs_and_the_error_names_the_cause(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _saved_lora(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    for read in (load_adapter_weights, lambda *a: load_adapter(*a)[1]):
        with pytest.raises(CheckpointError, match=r"could not be loaded as a weights-only pickle \(UnpicklingError: Weights only load failed"):
            read(tmp_path, None, True)
    assert "pwned" not in capsys.readouterr().out


def test_damaged_safetensors_names_the_file(tmp_path):
    _saved_lora(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    for read in (load_adapter_weights, lambda p: load_adapter(p)[1]):
        with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is not a readable safetensors file \(.+\); the file is damaged\."):
            read(tmp_path)


def test_missing_config_names_the_file_and_leaks_no_descriptor(tmp_path):
    import os

    _saved_lora(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"adapter_config\.json does not exist; is .* an adapter folder saved by save_pretrained\?"):
        load_adapter(tmp_path)
    _saved_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{ damaged")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(peftlab.PeftConfigError):
            load_adapter(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before  # the weights file opened first is closed again


def test_config_size_limit_is_exact(tmp_path):
    from peftlab.config import MAX_CONFIG_BYTES

    _saved_lora(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    # leading whitespace: reading a byte too few would cut the closing brace, not the padding
    (tmp_path / "adapter_config.json").write_text(" " * (MAX_CONFIG_BYTES - len(text)) + text)
    assert load_adapter(tmp_path)[0].r == 2
    (tmp_path / "adapter_config.json").write_text(" " * (MAX_CONFIG_BYTES - len(text) + 1) + text)
    with pytest.raises(peftlab.PeftConfigError, match="larger than 8 MiB"):
        load_adapter(tmp_path)


def test_set_state_dict_reports_every_problem_at_once_with_three_examples():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query", "value"]))
    model.peft_config["default"].base_model_name_or_path = "my-base"
    state = get_peft_model_state_dict(model)
    keys = sorted(state)
    for key in keys[:4]:
        state.pop(key)  # 4 missing
    state[keys[4]] = torch.zeros(7, 7)  # 1 shape mismatch
    for i in range(4):
        state[f"base_model.model.nowhere{i}.lora_A.weight"] = torch.zeros(2)  # 4 unexpected
    with pytest.raises(CheckpointError) as info:
        set_peft_model_state_dict(model, state)
    message = str(info.value)
    assert message.startswith("adapter 'default' does not fit this model: 4 tensors missing from the checkpoint (e.g. [")
    assert "; 4 checkpoint tensors the model has no place for (e.g. [" in message and "; 1 shape mismatches (e.g. [" in message
    assert "(it names base model 'my-base')" in message
    assert message.count("nowhere") == 3 and sum(message.count(k.removeprefix("base_model.model.")) for k in keys[:4]) == 3


def test_set_state_dict_accepts_keys_without_the_prefix_and_refuses_integer_tensors():
    torch.manual_seed(0)
    source = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False, target_modules=["query"]))
    state = get_peft_model_state_dict(source)
    target = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"]))
    set_peft_model_state_dict(target, {k.removeprefix("base_model.model."): v for k, v in state.items()})
    _assert_same(get_peft_model_state_dict(target), state)
    damaged = dict(state)
    key = next(iter(damaged))
    damaged[key] = damaged[key].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"adapter tensors \[.*\] are not floating point; the file is damaged\."):
        set_peft_model_state_dict(target, damaged)


def test_reading_from_a_state_dict_names_what_it_lacks():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(CheckpointError, match=r"state_dict lacks 8 of this adapter's tensors \(e\.g\. \['base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.default\.weight', '[^']+', '[^']+'\]\)"):
        get_peft_model_state_dict(model, state_dict={})


def test_messages_name_the_full_path_and_cap_examples_at_three(tmp_path):
    _saved_lora(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is not a readable safetensors file")):
        load_adapter(tmp_path)
    _saved_lora(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text("{ damaged")
    with pytest.raises(peftlab.PeftConfigError, match=re.escape(str(config))):
        load_adapter(tmp_path)

    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query", "value"]))
    model.peft_config["default"].base_model_name_or_path = None
    state = get_peft_model_state_dict(model)
    keys = sorted(state)
    shape_broken = {**state, **{k: torch.zeros(3, 3) for k in keys[:4]}}
    with pytest.raises(CheckpointError) as info:
        set_peft_model_state_dict(model, shape_broken)
    message = str(info.value)
    assert "4 shape mismatches (e.g. [" in message and message.count("checkpoint (3, 3) vs model") == 3
    assert "different model or config; load it into that model" in message  # no base named: nothing in between
    integer = {**state, **{k: v.to(torch.int32) for k, v in list(state.items())[:4]}}
    with pytest.raises(CheckpointError) as info:
        set_peft_model_state_dict(model, integer)
    assert re.fullmatch(r"adapter tensors \['[^']+', '[^']+', '[^']+'\] are not floating point; the file is damaged\.", str(info.value))
    nan = {**state, **{k: torch.full_like(v, float("nan")) for k, v in list(state.items())[:4]}}
    with pytest.raises(CheckpointError) as info:
        set_peft_model_state_dict(model, nan)
    assert re.search(r"4 tensors hold NaN/inf values \(e\.g\. \['[^']+', '[^']+', '[^']+'\]\)", str(info.value))


def test_classifier_adapter_saved_before_pre_classifier_was_a_head_loads(tmp_path):
    """peft < 0.22 saved DistilBERT classifiers without pre_classifier: it keeps the base weights, as in peft."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = tiny_distilbert()
    model = peftlab.get_peft_model(copy.deepcopy(base), peftlab.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin"]))
    assert model.peft_config["default"].modules_to_save == ["classifier", "pre_classifier"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier", "score"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pre_classifier" not in k}, tmp_path / "adapter_model.safetensors")

    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    head = loaded.get_base_model().pre_classifier
    assert torch.equal(head.modules_to_save["default"].weight, base.pre_classifier.weight)
    assert torch.equal(loaded.get_base_model().classifier.modules_to_save["default"].weight, base.classifier.weight + 0.5)
    # a head the config names must be in the file
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier", "pre_classifier"]}))
    with pytest.raises(peftlab.CheckpointError, match="missing"):
        peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = text_inputs()
    loaded.eval()
    assert torch.isfinite(loaded(**inputs).logits).all()

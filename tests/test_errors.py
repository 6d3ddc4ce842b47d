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


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=-2), dict(r=2.5), dict(lora_dropout=1.5), dict(bias="some"), dict(init_lora_weights="loftq")])
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
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(peftlab.CheckpointError, match="allow_pickle=True"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, allow_pickle=True)
    expected = peftlab.get_peft_model_state_dict(model)
    got = peftlab.get_peft_model_state_dict(loaded)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


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


# ----- bounds on names and numbers (issue 17) -------------------------------------------------------
@pytest.mark.parametrize("name", ["/abs/x", "a/b", "a\\b", "a\x00b", "..", ".", "", "a.b", "x" * 300, 123, "__base__"])
def test_adapter_names_are_plain_folder_names(tmp_path, name):
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2))
    with pytest.raises(peftlab.AdapterStateError, match="invalid adapter name"):
        model.add_adapter(name, LoraConfig(r=2))
    assert list(model.peft_config) == ["default"]
    with pytest.raises(peftlab.AdapterStateError, match="invalid adapter name"):
        get_peft_model(tiny_bert_cls(), LoraConfig(r=2), adapter_name=name)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside or outside


@pytest.mark.parametrize("kwargs", [dict(lora_alpha=1e308), dict(lora_alpha=-1e40), dict(r=1, lora_alpha=3.5e38),
                                    dict(alpha_pattern={"query": 1e300})])
def test_scale_beyond_float32_is_refused(kwargs):
    with pytest.raises(peftlab.PeftConfigError, match="float32"):
        LoraConfig(**kwargs)


def test_lycoris_scale_beyond_float32_is_refused():
    with pytest.raises(peftlab.PeftConfigError, match="float32"):
        peftlab.LoHaConfig(alpha=1e308)


@pytest.mark.parametrize("r", [65, 2**16])  # larger ranks: refused by the config itself (test_hostile)
def test_rank_above_layer_size_is_refused_before_allocating(r):
    import resource
    import time

    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"]))
    snap = snapshot(model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(peftlab.PeftConfigError, match=r"exceeds both sides of its 32x32 weight"):
        model.add_adapter("big", LoraConfig(r=r, target_modules=["query"]))
    assert time.monotonic() - start < 5
    # r=2**16 on a 32x32 layer would allocate 2 x 32 x 2**16 floats before a late check.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB
    assert_unchanged(model, snap)
    with pytest.raises(peftlab.PeftConfigError, match="exceeds"):
        get_peft_model(tiny_bert_cls(), peftlab.AdaLoraConfig(init_r=64, target_r=8, total_step=10, target_modules=["query"]))
    with pytest.warns(UserWarning, match="adds parameters but cannot change"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 3)), LoraConfig(r=5, target_modules=["0"]))


def test_non_finite_adapter_tensors_are_refused_and_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_bert_cls(), LoraConfig(r=4, task_type="SEQ_CLS")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("classifier.weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, tmp_path / "adapter_model.safetensors")
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(peftlab.CheckpointError, match="NaN/inf"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("case", ["huge", "deep", "not_utf8", "module_names", "many_modules"])
def test_hostile_config_files_give_config_errors_quickly(tmp_path, case):
    import time

    get_peft_model(tiny_bert_cls(), LoraConfig(r=2)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    if case == "huge":
        config["target_modules"] = ["query"] + ["x" * 1000] * 20_000  # 20 MB
        path.write_text(json.dumps(config))
    elif case == "deep":
        path.write_text('{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "not_utf8":
        path.write_bytes(json.dumps(config).encode("utf-8").replace(b'"query"', b'"qu\xffry"'))
    elif case == "module_names":
        config["modules_to_save"] = [123]
        path.write_text(json.dumps(config))
    elif case == "many_modules":
        config["modules_to_save"] = [f"m{i}" for i in range(100_000)]
        path.write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(peftlab.PeftConfigError):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    assert time.monotonic() - start < 5


def test_hostile_pickle_is_a_checkpoint_error(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    get_peft_model(tiny_bert_cls(), LoraConfig(r=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(peftlab.CheckpointError, match="weights-only pickle"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, allow_pickle=True)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(peftlab.CheckpointError, match="weights-only pickle"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, allow_pickle=True)


def test_safe_merge_checks_head_copies_and_selective_tensors():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["default"].weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(peftlab.AdapterStateError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    assert [type(m) for m in model.modules()] == snap[1]  # nothing unloaded
    assert all(torch.equal(p.detach(), snap[0][n][0]) for n, p in model.named_parameters() if "classifier" not in n)

    model = get_peft_model(tiny_bert_cls(), peftlab.SelectiveConfig(bitfit=True))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")).fill_(float("inf"))
    with pytest.raises(peftlab.AdapterStateError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)

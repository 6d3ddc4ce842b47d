"""peft's API surface that peft users write: task classes, AutoPeftModel, free functions, save/load arguments."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import peft_at_least, text_inputs, tiny_bert_cls, tiny_llama
import peftlab
from peftlab import (
    AdapterStateError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
)


def _cls_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))


def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_get_peft_model_returns_the_task_class_as_peft():
    assert type(_cls_model()) is PeftModelForSequenceClassification
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model, PeftModel)
    assert type(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))) is PeftModel
    with pytest.raises(AdapterStateError, match="PeftMixedModel"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), mixed=True)


def test_auto_peft_model_loads_base_and_adapter_from_the_adapter_folder(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    inputs = text_inputs()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        for auto in (AutoPeftModel, AutoPeftModelForCausalLM):
            loaded = auto.from_pretrained(tmp_path / "adapter").eval()
            assert isinstance(loaded, PeftModelForCausalLM)
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    with pytest.raises(PeftConfigError, match="AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_peft_loads_our_save_with_its_auto_class(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_free_functions(tmp_path):
    config = get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["query"]})
    assert isinstance(config, LoraConfig) and config.r == 4
    base = tiny_bert_cls()
    injected = inject_adapter_in_model(config, base)
    assert injected is base
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(PeftConfigError, match="get_peft_model"):
        inject_adapter_in_model(peftlab.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2), tiny_bert_cls())

    model = _cls_model()
    _perturb(model)
    model.save_pretrained(tmp_path)
    weights = load_peft_weights(tmp_path, device="cpu")
    ours = get_peft_model_state_dict(model)
    assert weights.keys() == ours.keys() and all(torch.equal(weights[k], ours[k]) for k in ours)
    assert type(PeftConfig.from_pretrained(tmp_path)) is LoraConfig


def test_enable_disable_adapter_layers():
    model = _cls_model()
    _perturb(model)
    model.eval()
    inputs = text_inputs()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
        model.disable_adapter_layers()
        off = model(**inputs).logits
        model.enable_adapter_layers()
        on = model(**inputs).logits
    assert torch.equal(off, plain) and torch.equal(on, adapted) and not torch.equal(adapted, plain)


def test_set_adapter_makes_a_frozen_loaded_adapter_trainable_as_peft(tmp_path):
    model = _cls_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.set_adapter("default")
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_A" in n)
    loaded.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(AdapterStateError, match="no adapter named 'other'"):
        loaded.set_adapter(["default", "other"])


def test_unload_gives_back_the_original_head_and_merge_keeps_the_chosen_copy():
    """As peft 0.22: unload() returns the original head, merge_and_unload the chosen adapter's copy."""
    torch.manual_seed(0)
    base = tiny_bert_cls()
    libs = [peftlab]
    peft = peft_at_least("0.22")
    if peft is not None:
        libs.append(peft)
    heads = {}
    for lib in libs:
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
        model.add_adapter("b", lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
        head = model.get_base_model().classifier
        copies = getattr(head, "modules_to_save", None) or head.copies
        with torch.no_grad():
            copies["default"].weight.add_(2.0)
            copies["b"].weight.add_(1.0)
        heads[lib.__name__] = (copy.deepcopy(model).unload().classifier.weight,
                               copy.deepcopy(model).merge_and_unload(adapter_names=["b"]).classifier.weight,
                               copy.deepcopy(model).merge_and_unload().classifier.weight)
    unloaded, merged_b, merged_active = heads["peftlab"]
    assert torch.equal(unloaded, base.classifier.weight)
    assert torch.equal(merged_b, base.classifier.weight + 1.0)
    assert torch.equal(merged_active, base.classifier.weight + 2.0)
    if "peft" in heads:
        for ours, theirs in zip(heads["peftlab"], heads["peft"]):
            assert torch.equal(ours, theirs)


def test_save_pretrained_arguments(tmp_path):
    model = _cls_model()
    _perturb(model)
    model.add_adapter("other", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "nothing", is_main_process=False)
    assert not (tmp_path / "nothing").exists()
    model.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "sel")) == ["other"]
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, selected_adapters=["default"])
    files = set(os.listdir(tmp_path / "bin"))
    assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files and "README.md" in files
    reloaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "bin", allow_pickle=True)
    saved = get_peft_model_state_dict(reloaded)
    assert all(torch.equal(saved[k], v) for k, v in get_peft_model_state_dict(model).items())
    with pytest.raises(AdapterStateError, match="modules_to_save"):
        model.save_pretrained(tmp_path / "emb", save_embedding_layers=True)
    with pytest.raises(AdapterStateError, match="does not know"):
        model.save_pretrained(tmp_path / "typo", safe_serialisation=True)
    assert not (tmp_path / "emb").exists() and not (tmp_path / "typo").exists()


def test_get_peft_model_state_dict_reads_the_given_state_dict():
    model = _cls_model()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for key in full:
        full[key] += 1.0
    live = get_peft_model_state_dict(model)
    given = get_peft_model_state_dict(model, state_dict=full)
    assert given.keys() == live.keys()
    assert all(torch.equal(given[k], live[k] + 1.0) for k in live)
    with pytest.raises(peftlab.CheckpointError, match="state_dict"):
        get_peft_model_state_dict(model, state_dict={"x": torch.zeros(1)})


def test_from_pretrained_keywords(tmp_path):
    model = _cls_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, torch_device="cpu", low_cpu_mem_usage=True,
                                       revision="main")  # a local folder has no revisions, as in peft
    assert type(loaded) is PeftModelForSequenceClassification
    half = PeftModel.from_pretrained(tiny_bert_cls().to(torch.bfloat16), tmp_path)
    kept = PeftModel.from_pretrained(tiny_bert_cls().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    dtypes = lambda m: {v.dtype for k, v in get_peft_model_state_dict(m).items() if "lora_" in k}  # noqa: E731
    assert dtypes(half) == {torch.float32} and dtypes(kept) == {torch.bfloat16}
    with pytest.raises(AdapterStateError, match="hotswap"):
        PeftModel.from_pretrained(tiny_bert_cls(), tmp_path, hotswap=True)


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(os.listdir(folder_path))
        calls["weights"] = load_peft_weights(folder_path)
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = _cls_model()
    _perturb(model)
    assert model.push_to_hub("me/adapter") == "commit"
    assert calls["repo"] == "me/adapter"
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ours = get_peft_model_state_dict(model)
    assert all(torch.equal(calls["weights"][k], ours[k]) for k in ours)


def test_layer_and_model_status_match_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_bert_cls()
    statuses = {}
    for lib in (peft, peftlab):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
        model.add_adapter("b", lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
        model.merge_adapter(["b"])
        statuses[lib.__name__] = (lib.get_layer_status(model), model.get_model_status())
    ours_layers, ours_model = statuses["peftlab"]
    theirs_layers, theirs_model = statuses["peft"]
    fields = ("name", "module_type", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices")
    norm = lambda v: repr(sorted(v.items())) if isinstance(v, dict) else repr(v)  # noqa: E731 - dict order aside
    as_rows = lambda layers: sorted(tuple(norm(getattr(s, f)) for f in fields) for s in layers)  # noqa: E731
    assert as_rows(ours_layers) == as_rows(theirs_layers)
    for field in ("base_model_type", "trainable_params", "total_params", "num_adapter_layers", "enabled", "active_adapters",
                  "merged_adapters", "requires_grad", "available_adapters", "devices", "peft_types"):
        assert getattr(ours_model, field) == getattr(theirs_model, field), field
    with pytest.raises(AdapterStateError, match="prompt"):
        get_peft_model(tiny_bert_cls(), peftlab.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)).get_layer_status()

"""peft's attribute surface: names, model / tuner / layer attributes, several active adapters.

Each check states peftlab's own behaviour (no peft needed) and, where peft >= 0.22 is installed,
compares with it on the same weights.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import peftlab
from conftest import peft_at_least, text_inputs, tiny_bert_cls, tiny_llama
from peftlab import AdapterStateError, LoraConfig, get_peft_model
from peftlab.unsupported import refusal

PEFT = peft_at_least("0.22")
both = pytest.mark.skipif(PEFT is None, reason="compares with peft >= 0.22 (the oracle)")


def _libs():
    return [peftlab] + ([PEFT] if PEFT is not None else [])


# ----- names ------------------------------------------------------------------------------------
@both
def test_every_peft_public_name_is_present_or_refused_with_an_alternative():
    uncovered = [n for n in PEFT.__all__ if not hasattr(peftlab, n) and refusal(n) is None]
    assert uncovered == []


def test_no_implemented_name_is_refused():
    assert [n for n in peftlab.__all__ if refusal(n) is not None] == []


def test_a_refused_name_says_what_to_use_on_import_and_on_attribute_access():
    with pytest.raises(ImportError, match="does not implement FourierFT.*use LoRA"):
        exec("from peftlab import FourierFTConfig", {})  # (as source: the import-graph test reads imports statically)
    with pytest.raises(AttributeError, match="does not implement BOFT"):
        peftlab.BOFTConfig  # noqa: B018
    assert not hasattr(peftlab, "XLoraModel") and getattr(peftlab, "LNTuningConfig", None) is None
    with pytest.raises(AttributeError, match="no attribute 'NotAPeftName'"):
        peftlab.NotAPeftName  # noqa: B018


def test_tables_and_errors():
    from peftlab import PeftType

    assert peftlab.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is LoraConfig
    assert peftlab.PEFT_TYPE_TO_CONFIG_MAPPING["IA3"] is peftlab.IA3Config
    assert set(peftlab.PEFT_TYPE_TO_CONFIG_MAPPING) == set(PeftType)
    assert peftlab.MODEL_TYPE_TO_PEFT_MODEL_MAPPING["CAUSAL_LM"] is peftlab.PeftModelForCausalLM
    assert peftlab.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] is peftlab.LoraModel
    assert issubclass(peftlab.NoMatchingPeftModuleError, peftlab.PeftError) and peftlab.PeftError is peftlab.PeftlabError
    with pytest.raises(peftlab.NoMatchingPeftModuleError):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["nothing_here"]))
    with pytest.raises(AdapterStateError, match="PeftMixedModel"):
        peftlab.PeftMixedModel(tiny_llama(), LoraConfig())


# ----- tuner classes ------------------------------------------------------------------------------
def test_isinstance_of_peft_tuner_names():
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    ia3 = get_peft_model(tiny_llama(), peftlab.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ada = get_peft_model(tiny_llama(), peftlab.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    assert isinstance(lora.base_model, peftlab.LoraModel) and not isinstance(lora.base_model, peftlab.IA3Model)
    assert isinstance(ia3.base_model, peftlab.IA3Model) and not isinstance(ia3.base_model, peftlab.LoraModel)
    assert isinstance(ada.base_model, peftlab.LoraModel) and isinstance(ada.base_model, peftlab.AdaLoraModel)
    assert not isinstance(tiny_llama(), peftlab.LoraModel)


def test_calling_a_tuner_name_injects_as_peft_does():
    base = tiny_llama()
    tuner = peftlab.LoraModel(base, LoraConfig(r=2, target_modules=["q_proj"]), "default")
    assert isinstance(tuner, peftlab.LoraModel) and tuner.model is base
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "LayerWrapper"
    assert list(tuner.peft_config) == ["default"] and tuner.targeted_module_names == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


# ----- model and tuner attributes -------------------------------------------------------------------
def test_model_attributes_as_peft():
    seen = {}
    for lib in _libs():
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_bert_cls(), lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
        seen[lib.__name__] = (model.peft_type.value, model.base_model.peft_config is model.peft_config, model.active_adapters,
                              model.base_model.active_adapter, model.base_model.prefix, model.base_model_torch_dtype,
                              model.has_active_enabled_adapter, model.active_peft_config is model.peft_config["default"])
        seen[lib.__name__ + ".heads"] = set(model.modules_to_save)
    assert seen["peftlab"] == ("LORA", True, ["default"], ["default"], "lora_", torch.float32, True, True)
    assert seen["peftlab.heads"] == {"classifier"}  # the heads BERT has (peft also lists absent head names)
    if "peft" in seen:
        assert seen["peft"] == seen["peftlab"] and seen["peftlab.heads"] <= seen["peft.heads"]


def test_set_requires_grad_and_model_card(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    lora_b = [p for n, p in model.named_parameters() if ".b.weight" in n]
    assert lora_b and not any(p.requires_grad for p in lora_b)
    model.set_requires_grad("b")
    assert all(p.requires_grad for p in lora_b) and model.active_adapters == ["default"]
    model.base_model.set_requires_grad(["b"], requires_grad=False)
    assert not any(p.requires_grad for p in lora_b)
    with pytest.raises(AdapterStateError, match="unknown adapters"):
        model.set_requires_grad("c")
    model.create_or_update_model_card(tmp_path)
    assert "LoRA" in (tmp_path / "README.md").read_text() or "LORA" in (tmp_path / "README.md").read_text()


def test_get_prompt_as_peft():
    for lib in _libs():
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_llama(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        prompt = model.get_prompt(batch_size=2)
        assert prompt.shape == (2, 3, 32)
        saved = model.get_prompt_embedding_to_save("default")
        assert saved.shape == (3, 32) and torch.equal(prompt[1], saved)
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="not a prompt method"):
        lora.get_prompt(1)


# ----- adapted layers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True), dict(r=2, use_dora=True)])
def test_layer_attributes_as_peft(kwargs):
    seen = {}
    for lib in _libs():
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], **kwargs))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        before = (layer.scaling, layer.r, layer.lora_alpha, layer.use_dora, layer.merged, layer.disable_adapters,
                  layer.active_adapter, layer.in_features, layer.fan_in_fan_out, type(layer.get_base_layer()).__name__)
        model.merge_adapter()
        merged = layer.merged
        model.unmerge_adapter()
        with model.disable_adapter():
            disabled = layer.disable_adapters
        seen[lib.__name__] = (before, merged, disabled)
    r, alpha = kwargs["r"], kwargs.get("lora_alpha", 8)
    scale = alpha / r ** 0.5 if kwargs.get("use_rslora") else alpha / r
    assert seen["peftlab"] == (({"default": scale}, {"default": r}, {"default": alpha}, {"default": bool(kwargs.get("use_dora"))},
                                False, False, ["default"], 32, False, "Linear"), True, True)
    if "peft" in seen:
        assert seen["peft"] == seen["peftlab"]


def test_layer_scale_controls_as_peft():
    outs = {}
    for lib in _libs():
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
        model.eval()
        layers = [m for n, m in model.named_modules() if n.endswith("self_attn.q_proj")]
        inputs = text_inputs()
        with torch.no_grad():
            plain = model(**inputs).logits
            for layer in layers:
                layer.scale_layer(0.0)
            off = model(**inputs).logits
            for layer in layers:
                layer.unscale_layer()
            back = model(**inputs).logits
            for layer in layers:
                layer.set_scale("default", 0.5)
            half = model(**inputs).logits
            delta = layers[0].get_delta_weight("default")
        outs[lib.__name__] = (plain, off, back, half, delta)
        with model.disable_adapter(), torch.no_grad():
            assert torch.allclose(off, model(**inputs).logits, atol=1e-6)  # scale 0 == no adapter
        assert torch.equal(plain, back) and not torch.allclose(plain, half)
        assert layers[0].scaling["default"] == 1.0  # 0.5 * 8 / 4
    if "peft" in outs:
        for ours, theirs in zip(outs["peftlab"], outs["peft"]):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ----- several active adapters --------------------------------------------------------------------------
def _two_adapters(lib, base):
    torch.manual_seed(1)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    torch.manual_seed(2)
    model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    return model


def test_several_active_adapters_add_up_and_train_as_peft():
    torch.manual_seed(0)
    base = tiny_llama()
    inputs = text_inputs()
    seen = {}
    for lib in _libs():
        model = _two_adapters(lib, base)
        model.base_model.set_adapter(["a", "b"])
        model.eval()
        with torch.no_grad():
            out = model(**inputs).logits
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        seen[lib.__name__] = (out, trainable, model.active_adapters, model.base_model.active_adapter)
    out, trainable, active, tuner_active = seen["peftlab"]
    assert active == ["a", "b"] and tuner_active == ["a", "b"]
    assert any(".a." in n for n in trainable) and any(".b." in n for n in trainable)
    # Both updates in the weights give the same model: the active adapters' updates add up.
    merged = _two_adapters(peftlab, base).merge_and_unload(adapter_names=["a", "b"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, merged(**inputs).logits, atol=1e-5, rtol=1e-5)
    if "peft" in seen:
        torch.testing.assert_close(out, seen["peft"][0], atol=1e-5, rtol=1e-5)
        assert seen["peft"][1:] == seen["peftlab"][1:]


def test_several_active_then_one_and_delete():
    model = _two_adapters(peftlab, tiny_llama())
    model.set_adapter(["a", "b"])
    model.add_adapter("c", LoraConfig(r=2, target_modules=["o_proj"]))
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.active_adapters == ["a", "b"]  # a layer built later follows the active set
    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    model.set_adapter("c")
    assert model.active_adapters == ["c"] and not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    prompt = get_peft_model(tiny_llama(), peftlab.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    prompt.add_adapter("x", peftlab.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AdapterStateError, match="one adapter at a time"):
        prompt.set_adapter(["default", "x"])


# ----- functions -------------------------------------------------------------------------------------
def test_cast_mixed_precision_params():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    peftlab.cast_mixed_precision_params(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_base_model_state_dict_round_trip_as_peft():
    torch.manual_seed(0)
    base = tiny_bert_cls()
    for lib in _libs():
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
        state = lib.get_base_model_state_dict(model)
        assert state.keys() == base.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
        doubled = {k: v * 2 for k, v in state.items()}
        lib.set_base_model_state_dict(model, doubled)
        assert torch.equal(model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight,
                           2 * base.bert.encoder.layer[0].attention.self.query.weight)


def test_shift_tokens_right():
    ids = torch.tensor([[5, 6, -100], [7, 8, 9]])
    assert peftlab.shift_tokens_right(ids, pad_token_id=0, decoder_start_token_id=2).tolist() == [[2, 5, 6], [2, 7, 8]]


def test_peft_api_doc_is_current():
    """docs/peft_api.md is written by tools/peft_api_doc.py from peft's names and peftlab's tables."""
    if PEFT is None:
        pytest.skip("the document lists peft 0.22's names: needs peft >= 0.22 installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "peft_api_doc.py"), "--check"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr

"""Numerical parity with Hugging Face peft on the same weights, and checkpoints moving both ways.

For each case: one random base model; peft and peftlab each wrap a deep copy with a
non-identity init; an adapter saved by one library is loaded by the other and must give the
same outputs (atol 1e-5, fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from conftest import ConvNet, main_output, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")


def conv_inputs():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 3, 6, 6, generator=g), "ids": torch.randint(0, 20, (2, 4), generator=g)}


# id -> (base builder, inputs, kwargs shared by both LoraConfig/IA3Config, method)
CASES = {
    "bert-lora-qv-seqcls": (tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]), "lora"),
    "bert-lora-all-linear-bias-rslora-patterns": (
        tiny_bert_cls, text_inputs,
        dict(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules="all-linear", bias="all", use_rslora=True,
             rank_pattern={"value": 2}, alpha_pattern={"key": 3}),
        "lora",
    ),
    "bert-lora-layers-lora-only-bias": (
        tiny_bert_cls, text_inputs,
        dict(task_type="SEQ_CLS", r=3, target_modules=["query", "key"], layers_to_transform=[1], bias="lora_only"),
        "lora",
    ),
    "bert-lora-regex": (
        tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS", r=3, target_modules=r".*\.(query|key)"), "lora"
    ),
    "bert-ia3-default": (tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS"), "ia3"),
    # DistilBERT's randomly initialised pre_classifier is a trained head too (peft >= 0.22 saves it)
    "distilbert-lora-seqcls": (tiny_distilbert, text_inputs, dict(task_type="SEQ_CLS", r=4, target_modules=["q_lin", "v_lin"]), "lora"),
    "distilbert-ia3-ffn": (tiny_distilbert, text_inputs, dict(task_type="SEQ_CLS", target_modules=["k_lin", "v_lin", "lin2"], feedforward_modules=["lin2"]), "ia3"),
    "gpt2-lora-conv1d-embedding": (
        tiny_gpt2, text_inputs, dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True), "lora"
    ),
    "gpt2-ia3-default": (tiny_gpt2, text_inputs, dict(task_type="CAUSAL_LM", fan_in_fan_out=True), "ia3"),
    "llama-lora-all-linear": (tiny_llama, text_inputs, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"), "lora"),
    "llama-ia3-default": (tiny_llama, text_inputs, dict(task_type="CAUSAL_LM"), "ia3"),
    "t5-lora-default": (tiny_t5, seq2seq_inputs, dict(task_type="SEQ_2_SEQ_LM", r=4), "lora"),
    "t5-ia3-default": (tiny_t5, seq2seq_inputs, dict(task_type="SEQ_2_SEQ_LM"), "ia3"),
    "convnet-lora-conv-emb-linear": (ConvNet, conv_inputs, dict(r=2, target_modules=["conv", "pointwise", "emb", "lin"]), "lora"),
    "convnet-ia3-conv": (ConvNet, conv_inputs, dict(target_modules=["conv", "pointwise", "lin"], feedforward_modules=["pointwise"]), "ia3"),
}


def configs(kwargs: dict, method: str):
    if method == "lora":
        return peftlab.LoraConfig(init_lora_weights=False, **kwargs), peft.LoraConfig(init_lora_weights=False, **kwargs)
    return peftlab.IA3Config(init_ia3_weights=False, **kwargs), peft.IA3Config(init_ia3_weights=False, **kwargs)


def randomize_heads(model: torch.nn.Module) -> None:
    """Trained heads start as copies of the base head; move them so saving them is tested."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
            if param.requires_grad and name.endswith("bias") and "lora" not in name and "modules_to_save" not in name:
                param.add_(torch.randn_like(param) * 0.1)


def outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftlab(case, tmp_path):
    build, make_inputs, kwargs, method = CASES[case]
    torch.manual_seed(0)
    base = build()
    ours_cfg, peft_cfg = configs(kwargs, method)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    randomize_heads(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = make_inputs()
    expected = outputs(theirs, inputs)
    assert not torch.allclose(expected, outputs(base, inputs), atol=1e-4), "adapter must change the output"
    torch.testing.assert_close(outputs(ours, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peftlab_adapter_loads_in_peft(case, tmp_path):
    build, make_inputs, kwargs, method = CASES[case]
    torch.manual_seed(0)
    base = build()
    ours_cfg, _ = configs(kwargs, method)
    torch.manual_seed(2)
    ours = peftlab.get_peft_model(copy.deepcopy(base), ours_cfg)
    randomize_heads(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = make_inputs()
    expected = outputs(ours, inputs)
    assert not torch.allclose(expected, outputs(base, inputs), atol=1e-4)
    torch.testing.assert_close(outputs(theirs, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["bert-lora-qv-seqcls", "llama-lora-all-linear", "gpt2-ia3-default"])
def test_same_trainable_parameter_count_as_peft(case):
    build, _, kwargs, method = CASES[case]
    base = build()
    ours_cfg, peft_cfg = configs(kwargs, method)
    ours = peftlab.get_peft_model(copy.deepcopy(base), ours_cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_mixed_batch_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    cfg_a = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    cfg_b = dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg_a), "a")
    theirs.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **cfg_b))
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a" if (tmp_path / "a").exists() else tmp_path, adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    inputs = text_inputs(batch=4)
    names = ["a", "b", "__base__", "a"]
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=names).logits
        got = ours(**inputs, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_kind", ["bert_cls", "llama_no_cache"])
def test_interleaved_mixed_batch_matches_peft(tmp_path, model_kind):
    """Rows alternating between adapters: peftlab regroups them; the logits must not notice."""
    torch.manual_seed(0)
    if model_kind == "bert_cls":
        base, task, targets, extra = tiny_bert_cls(), "SEQ_CLS", ["query", "value"], {}
    else:
        base, task, targets, extra = tiny_llama(), "CAUSAL_LM", ["q_proj", "v_proj"], {"use_cache": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task, r=4, target_modules=targets, init_lora_weights=False), "a")
    theirs.add_adapter("b", peft.LoraConfig(task_type=task, r=2, target_modules="all-linear", init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a" if (tmp_path / "a").exists() else tmp_path, adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    names = ["a", "b", "__base__", "a", "b", "a", "b", "__base__"]
    inputs = text_inputs(batch=len(names))
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=names, **extra).logits
        got = ours(**inputs, adapter_names=names, **extra).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

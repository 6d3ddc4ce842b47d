"""Target matching rules and per-architecture defaults."""

from __future__ import annotations

import pytest
from torch import nn

from peftlab import IA3Config, LoraConfig, get_peft_model
from peftlab.layers import LayerWrapper
from peftlab.targeting import candidates, layer_index, name_matches, pattern_value
from conftest import tiny_bart, tiny_bert_cls, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, tiny_vit

ARCHS = [tiny_bert_cls, tiny_roberta, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_t5, tiny_bart, tiny_vit]


def adapted(model) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, LayerWrapper)]


@pytest.mark.parametrize("build", ARCHS)
@pytest.mark.parametrize("config", [LoraConfig, IA3Config])
def test_default_targets_exist_for_architecture(build, config):
    model = get_peft_model(build(), config())
    assert adapted(model)


def test_name_matching_rules():
    assert name_matches("encoder.layer.0.attention.self.query", ["query"])
    assert name_matches("encoder.layer.0.attention.self.query", ["self.query"])
    assert not name_matches("encoder.layer.0.attention.self.query_proj", ["query"])
    assert name_matches("encoder.layer.0.attention.self.query", r".*\.query")
    assert not name_matches("encoder.layer.0.attention.self.query", r"query")  # regex must match in full


def test_layer_index_and_patterns():
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("model.layers.3.self_attn.q_proj", "layers") == 3
    assert layer_index("lm_head", None) is None
    assert pattern_value({"v_proj": 16}, "model.layers.0.self_attn.v_proj", 8) == 16
    assert pattern_value({"v_proj": 16}, "model.layers.0.self_attn.q_proj", 8) == 8


def test_layers_to_transform_and_exclude():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], exclude_modules=["v_proj"]))
    assert adapted(model) == ["model.layers.1.self_attn.q_proj"]


def test_all_linear_gpt2_leaves_lm_head():
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    names = adapted(model)
    assert "lm_head" not in names and any(n.endswith("c_attn") for n in names)


def test_candidates_lists_linear_layers():
    found = {c.name: c for c in candidates(tiny_bert_cls())}
    query = found["bert.encoder.layer.0.attention.self.query"]
    assert query.type_name == "Linear" and query.shape == (32, 32) and query.num_params == 32 * 32 + 32
    model = tiny_bert_cls()
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d))}
    assert set(found) == expected  # every Linear and Embedding (word, position, token type), nothing else
    assert found["bert.embeddings.word_embeddings"].shape == (99, 32)


def test_peft_wrapper_names_in_target_modules_are_ignored():
    """peft saves names like "classifier.original_module" for a second all-linear adapter; peft and we skip them."""
    from peftlab.errors import TargetModuleError

    model = get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=["query", "classifier.original_module", "classifier.modules_to_save.a"]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LayerWrapper)]
    assert adapted and all(n.endswith("query") for n in adapted)
    with pytest.raises(TargetModuleError, match="match no module"):
        get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=["query", "quary"]))  # a real typo still fails
    with pytest.raises(TargetModuleError, match="selects no module"):
        get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=["classifier.original_module"]))

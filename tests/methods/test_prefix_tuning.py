"""Prefix tuning (with and without projection): the prompt contract table plus cache, Trainer and
bad-input checks."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PrefixTuningConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, peft_oracle


def _pair(task: str, **kwargs):
    return (lambda: PrefixTuningConfig(task_type=task, **kwargs), lambda: peft_oracle().PrefixTuningConfig(task_type=task, **kwargs))


PLAIN = dict(num_virtual_tokens=4)
PROJ = dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)

CASES = {
    "bert-seq-cls": PromptCase(tiny_bert_cls, text_inputs, *_pair("SEQ_CLS", **PLAIN)),
    "roberta-seq-cls-projection": PromptCase(tiny_roberta, text_inputs, *_pair("SEQ_CLS", **PROJ)),
    "gpt2-causal": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **PLAIN), generates=True),
    "gpt2-causal-projection": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **PROJ), generates=True),
    "llama-gqa-causal": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", **PLAIN), generates=True),
    "llama-gqa-causal-projection": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", **PROJ), generates=True),
    "t5-seq2seq": PromptCase(tiny_t5, seq2seq_inputs, *_pair("SEQ_2_SEQ_LM", **PLAIN), generates=True),
}
globals().update(prompt_contract_tests(CASES))


def test_trainer_seq_cls(tmp_path):
    from _prompt_contract import check_trainer_trains

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    check_trainer_trains(model, tmp_path)


def test_grouped_query_attention_sizes_the_prefix_by_key_value_heads():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)  # 2 kv heads x head_dim 8
    assert model.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)


def test_prefix_is_a_cache_of_num_virtual_tokens_positions():
    from transformers import DynamicCache

    from peftlab.methods.prompt.inputs import prefix_cache

    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    rows = model.prompt_encoder["default"].rows()
    cache = prefix_cache(model.get_base_model(), rows, model.peft_config["default"], batch=2)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    # layer 1's keys are row block 2 (blocks go k0, v0, k1, v1), split into 4 heads of 8
    keys = cache.layers[1].keys
    assert keys.shape == (2, 4, 3, 8)
    torch.testing.assert_close(keys[0, 1], rows[:, 2 * 32 + 8: 2 * 32 + 16])


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)])
def test_beam_search_and_sampling_match_peft(kwargs):
    from _prompt_contract import peft_oracle_is_usable, require_peft_oracle, twin_models

    if not peft_oracle_is_usable(CASES["gpt2-causal"], generation=True):
        if kwargs.get("do_sample"):
            require_peft_oracle(CASES["gpt2-causal"], generation=True)  # no peft-free reference for sampling
        check_beams_batched_equal_row_by_row(kwargs)
        return
    _, theirs, ours = twin_models(CASES["gpt2-causal"])
    inputs = text_inputs()
    outs = []
    for model in (theirs, ours):
        torch.manual_seed(3)
        outs.append(model.eval().generate(**inputs, max_new_tokens=3, **kwargs))
    assert torch.equal(outs[0], outs[1])


def check_beams_batched_equal_row_by_row(kwargs):
    """Without the oracle: beam search over a batch equals beam search row by row. generate() repeats
    every input per beam but not the prefix cache, so a cache built at the wrong size fails here."""
    from _prompt_contract import own_model

    _, ours = own_model(CASES["gpt2-causal"])
    ours.eval()
    inputs = text_inputs()
    with torch.no_grad():
        batched = ours.generate(**inputs, max_new_tokens=3, **kwargs)
        rows = [ours.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, max_new_tokens=3, **kwargs) for i in range(3)]
    assert torch.equal(batched, torch.cat(rows))


def test_projection_is_dropped_on_load_and_outputs_are_kept(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", **PROJ)).eval()
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == 3 * 32 + (32 * 16 + 16) + (16 * 128 + 128)
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    inputs = text_inputs()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


def test_position_ids_shift_past_the_prefix():
    """Explicit position ids 0..T-1 move past the n prefix positions: the hand-built reference (real
    tokens at n..n+T-1) and, where it can run, peft agree."""
    from _prompt_contract import own_model, peft_oracle_is_usable, reference_logits, run, twin_models

    case = CASES["llama-gqa-causal"]
    inputs = text_inputs()
    base, ours = own_model(case)
    expected = reference_logits(case, base, ours, inputs)
    inputs["position_ids"] = torch.arange(7).expand(3, -1)
    torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    if peft_oracle_is_usable(case):
        _, theirs, ours = twin_models(case)
        torch.testing.assert_close(run(ours, inputs), run(theirs, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])  # transformers >= 5.24 calls it cache
def test_passing_a_cache_is_refused(name):
    from transformers import DynamicCache

    model = get_peft_model(tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(PeftConfigError, match="supplies past_key_values itself"):
        model(**text_inputs(), **{name: DynamicCache()})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=2.5), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=4, init_weights="ones"), "init_weights must be None or 'zero'"),
        (dict(num_virtual_tokens=4, prefix_projection="yes"), "prefix_projection must be True or False"),
        (dict(num_virtual_tokens=4, task_type="TOKEN_CLS"), "not supported by prompt methods"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    with pytest.raises(PeftConfigError, match=match):
        PrefixTuningConfig(**kwargs)


def test_model_without_a_cache_is_rejected_and_left_untouched():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    with pytest.raises(PeftConfigError, match="does not take a key/value cache"):
        get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.classifier).__name__ == "Linear"

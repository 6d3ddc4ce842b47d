"""Core behaviour against hand-computed references (no Hugging Face peft needed).

peft parity (tests/test_peft_parity.py, the contract tables) is the second, independent witness;
these checks hold on their own, on any transformers version. Adapter tensors are read and written
through the public on-disk names (get/set_peft_model_state_dict), never through module internals.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab import LoraConfig, PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
from _references import (
    greedy_by_reference,
    lora_linear_reference,
    prefix_reference_logits,
)
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5

# float64 throughout the LoRA/DoRA checks: a few dozen products and sums of O(1) terms each, so
# rounding stays near 1e-15; 1e-12 leaves room without letting any formula change through.
EXACT = dict(rtol=1e-12, atol=1e-12)


class OneLinear(nn.Module):
    def __init__(self, in_features: int = 7, out_features: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.lin(x)


def _saved(model, name: str) -> torch.Tensor:
    """One adapter tensor by its on-disk key (``base_model.model.lin.<name>``)."""
    return get_peft_model_state_dict(model)[f"base_model.model.lin.{name}"]


def _lora_model(r: int, rslora: bool, alpha: float = 6.0, seed: int = 0, dims: tuple[int, int] = (7, 5), **kw):
    torch.manual_seed(seed)
    net = OneLinear(*dims).double()
    original = net.lin  # kept by reference: it becomes the adapted layer's frozen base
    weight, bias = original.weight.detach().clone(), original.bias.detach().clone()
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["lin"], init_lora_weights=False, **kw)
    return get_peft_model(net, config), original, weight, bias


@pytest.mark.parametrize("r", [2, 3, 8, 16])
@pytest.mark.parametrize("rslora", [True, False], ids=["rslora", "lora"])
def test_lora_output_and_merge_match_hand_computation(r, rslora):
    """s = alpha / sqrt(r) with rsLoRA, alpha / r without; r = 4 is the one rank where sqrt(r) = r / 2,
    so it is left out on purpose."""
    model, original, weight, bias = _lora_model(r, rslora, dims=(23, 19))  # r <= min(in, out) for every r tested
    lora_a, lora_b = _saved(model, "lora_A.weight"), _saved(model, "lora_B.weight")
    assert lora_a.shape == (r, 23) and lora_b.shape == (19, r)
    assert lora_b.abs().min() > 0, "B must be non-zero, or the scaling is never seen"
    x = torch.randn(4, 23, dtype=torch.float64)
    expected = lora_linear_reference(x, weight, bias, lora_a, lora_b, 6.0, r, rslora)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **EXACT)
        merged = model.merge_and_unload()
        scaling = 6.0 / math.sqrt(r) if rslora else 6.0 / r
        torch.testing.assert_close(original.weight, weight + scaling * lora_b @ lora_a, **EXACT)
        torch.testing.assert_close(merged(x), expected, **EXACT)


def test_rslora_and_lora_differ_except_at_rank_one():
    x = torch.randn(3, 7, dtype=torch.float64)
    for r in (1, 2, 3):
        outs = [_lora_model(r, rslora)[0](x).detach() for rslora in (True, False)]
        assert torch.equal(outs[0], outs[1]) == (r == 1), r


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_merge_and_unload_safe_merge_refuses_non_finite(quantized):
    """safe_merge must reach the merge that merge_and_unload does: a NaN adapter is refused, weights untouched."""
    torch.manual_seed(0)
    net = tiny_llama().eval()
    if quantized:
        pytest.importorskip("bitsandbytes")
        from peftlab.quantization import QuantConfig, dequantize_weight, quantize_model

        net = quantize_model(net, QuantConfig(bits=8)).eval()
    original = net.model.layers[0].self_attn.q_proj  # becomes the adapted layer's base
    read = (lambda: dequantize_weight(original)) if quantized else (lambda: original.weight.detach().clone())
    before = read()
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    # Loading refuses non-finite tensors, so the NaN goes straight into the live parameter (as a diverged run would).
    with torch.no_grad():
        dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].fill_(float("nan"))
    with pytest.raises(peftlab.AdapterStateError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(read(), before, rtol=0, atol=0)
    # the precondition: without safe_merge the same adapter does write NaN into the weight
    merged = model.merge_and_unload()  # a quantized base comes back dequantized
    assert torch.isnan(merged.model.layers[0].self_attn.q_proj.weight).any()


# ----- prefix tuning -----------------------------------------------------------------------------
PREFIX_BUILDS = {
    "llama-gqa": (tiny_llama, "CAUSAL_LM", dict(num_virtual_tokens=4)),
    "llama-gqa-projection": (tiny_llama, "CAUSAL_LM", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", dict(num_virtual_tokens=4)),
    "bert-seq-cls": (tiny_bert_cls, "SEQ_CLS", dict(num_virtual_tokens=4)),
    "roberta-seq-cls-projection": (tiny_roberta, "SEQ_CLS", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    "t5-seq2seq": (tiny_t5, "SEQ_2_SEQ_LM", dict(num_virtual_tokens=4)),
}


def _prefix_model(name: str):
    build, task, kwargs = PREFIX_BUILDS[name]
    torch.manual_seed(0)
    base = build().eval()
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=task, **kwargs))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move the prefix (and any head copy) away from its init
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.5)
    return base, model.eval()


@pytest.mark.parametrize("name", list(PREFIX_BUILDS))
def test_prefix_forward_matches_hand_built_attention(name):
    base, model = _prefix_model(name)
    inputs = seq2seq_inputs() if base.config.is_encoder_decoder else text_inputs()
    expected = prefix_reference_logits(base, get_peft_model_state_dict(model), inputs["input_ids"], inputs.get("decoder_input_ids"))
    with torch.no_grad():
        got = model(**inputs).logits
        assert not torch.allclose(expected, base(**inputs).logits, atol=1e-3), "the prefix must change the output"
    # float32, attention over <= 11 positions and 2 layers: rounding ~1e-7 relative, far below 1e-5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_prefix_generate_matches_greedy_over_the_reference(name):
    base, model = _prefix_model(name)
    saved = get_peft_model_state_dict(model)
    ids = text_inputs()["input_ids"]
    config = base.config
    expected = greedy_by_reference(lambda seq: prefix_reference_logits(base, saved, seq), ids, 4,
                                   config.eos_token_id, config.pad_token_id)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected), (got, expected)

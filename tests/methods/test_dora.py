"""DoRA (LoraConfig(use_dora=True)): the contract table plus hand-computed checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab import LoraConfig, TargetModuleError, get_peft_model
from _contract import Case, contract_tests, conv_inputs
from conftest import ConvNet, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().LoraConfig(use_dora=True, init_lora_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: LoraConfig(use_dora=True, init_lora_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
LLAMA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True, rank_pattern={"v_proj": 2})
GPT2 = dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.1)
CONV = dict(r=2, target_modules=["lin"])

# perturb=True moves the magnitude away from its init value ||W + sBA||, where DoRA equals LoRA.
T5 = dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v"])

CASES = {
    "bert-qv-dense": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT), perturb=True),
    "llama-all-linear-rslora": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA), perturb=True),
    "gpt2-conv1d-dropout": Case(tiny_gpt2, text_inputs, _ours(**GPT2), _peft(**GPT2), perturb=True),
    "convnet-linear": Case(ConvNet, conv_inputs, _ours(**CONV), _peft(**CONV), perturb=True),
    "t5-seq2seq": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5), perturb=True),
}
globals().update(contract_tests(CASES))


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x)


def _dora_model(**kwargs):
    torch.manual_seed(0)
    net = OneLinear()
    w, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["lin"], use_dora=True, **kwargs))
    return model, w, b


def test_magnitude_starts_at_row_norm_of_adapted_weight():
    model, w, _ = _dora_model(init_lora_weights=False)
    ad = model.get_base_model().lin.adapters["default"]
    adapted = w + ad.lora_B.weight.detach() @ ad.lora_A.weight.detach() * 3
    torch.testing.assert_close(ad.lora_magnitude_vector.weight.detach(), adapted.norm(dim=1))


def test_forward_matches_decomposed_weight():
    model, w, b = _dora_model(init_lora_weights=False)
    ad = model.get_base_model().lin.adapters["default"]
    with torch.no_grad():
        ad.lora_magnitude_vector.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    adapted = w + ad.lora_B.weight.detach() @ ad.lora_A.weight.detach() * 3
    expected_w = torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(model(x), x @ expected_w.T + b)


def _trainable(model: nn.Module, part: str) -> nn.Parameter:
    found = [p for n, p in model.named_parameters() if part in n and p.requires_grad]
    assert len(found) == 1, (part, [n for n, _ in model.named_parameters()])
    return found[0]


def test_norm_is_constant_in_backward():
    """DoRA treats ||W + s B A|| as a constant in backward (paper, section 4.3): the gradients equal the
    hand-written formula of tests/_references.py::dora_gradients. Differentiating the norm adds terms
    to dL/dA and dL/dB (and dL/dm stays the same), so only A's and B's gradients can tell."""
    from _references import dora_gradients

    torch.manual_seed(0)
    net = OneLinear().double()
    original = net.lin
    weight = original.weight.detach().clone()  # the bias adds a constant: no gradient term
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["lin"], use_dora=True, init_lora_weights=False))
    state = peftlab.get_peft_model_state_dict(model)
    state["base_model.model.lin.lora_magnitude_vector"] = torch.tensor([0.5, 1.5, 2.0, 3.0], dtype=torch.float64)
    peftlab.set_peft_model_state_dict(model, state)
    lora_a, lora_b, magnitude = (state[f"base_model.model.lin.{k}"] for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    x, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    model.train()
    (model(x) * g).sum().backward()
    expected = dora_gradients(x, g, weight, lora_a, lora_b, magnitude, scaling=3.0)
    for part in ("magnitude", "lora_A", "lora_B"):  # float64, a few dozen terms: rounding ~1e-15
        torch.testing.assert_close(_trainable(model, part).grad, expected[part], rtol=1e-12, atol=1e-12, msg=part)
    assert original.weight.grad is None


def test_gradients_match_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = OneLinear()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["lin"], use_dora=True, init_lora_weights=False))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True)
    x = torch.randn(4, 5)
    theirs(x).pow(2).sum().backward()
    ours(x).pow(2).sum().backward()
    ad = ours.get_base_model().lin.adapters["default"]
    layer = theirs.base_model.model.lin
    torch.testing.assert_close(ad.lora_magnitude_vector.weight.grad, layer.lora_magnitude_vector["default"].weight.grad)
    torch.testing.assert_close(ad.lora_A.weight.grad, layer.lora_A["default"].weight.grad)


def test_checkpoint_key_is_peft_s():
    model, _, _ = _dora_model()
    keys = set(peftlab.get_peft_model_state_dict(model))
    assert keys == {"base_model.model.lin.lora_A.weight", "base_model.model.lin.lora_B.weight",
                    "base_model.model.lin.lora_magnitude_vector"}


def test_unsupported_layer_is_rejected():
    with pytest.raises(TargetModuleError, match=r"conv \(Conv2d\).*use_dora=False"):
        get_peft_model(ConvNet(), LoraConfig(target_modules=["conv"], use_dora=True))


@pytest.mark.parametrize("init", [True, False])
def test_init_lora_weights_reaches_the_dora_factors(init):
    """True: B = 0 (DoRA starts as the base layer); False: both factors random (a mutation that dropped it survived)."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoraConfig(r=2, target_modules=["lin"], use_dora=True, init_lora_weights=init))
    lora_b = peftlab.get_peft_model_state_dict(model)["base_model.model.lin.lora_B.weight"]
    assert bool((lora_b == 0).all()) == init


def test_config_roundtrip_keeps_use_dora(tmp_path):
    LoraConfig(use_dora=True, target_modules=["q"]).save_pretrained(tmp_path)
    assert peftlab.PeftConfig.from_pretrained(tmp_path).use_dora is True


def test_dropout_reaches_both_terms_in_training():
    """With dropout in training, peft's DoRA output is ``W x + b + (k - 1) W d(x) + k s B A d(x)``, k = m / ||W + s B A||:
    the dropped input goes through the magnitude term too (a mutation that skipped the recompute survived)."""
    torch.manual_seed(0)
    net = OneLinear().double()
    weight, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["lin"], use_dora=True,
                                           init_lora_weights=False, lora_dropout=0.5))
    state = peftlab.get_peft_model_state_dict(model)
    state["base_model.model.lin.lora_magnitude_vector"] = torch.tensor([0.5, 1.5, 2.0, 3.0], dtype=torch.float64)
    peftlab.set_peft_model_state_dict(model, state)
    lora_a, lora_b, magnitude = (state[f"base_model.model.lin.{k}"] for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    x = torch.randn(6, 5, dtype=torch.float64)
    model.train()
    torch.manual_seed(3)
    got = model(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the adapter's one random draw
    assert not torch.equal(dropped, x)
    k = magnitude / (weight + 3.0 * lora_b @ lora_a).norm(dim=1)
    expected = x @ weight.T + bias + (k - 1) * (dropped @ weight.T) + k * 3.0 * (dropped @ lora_a.T @ lora_b.T)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dora_refuses_an_additive_delta_and_unmerging_what_it_did_not_merge():
    model, w, _ = _dora_model(init_lora_weights=False)
    layer = model.get_base_model().lin
    adapter = layer.adapters["default"]
    with pytest.raises(peftlab.AdapterStateError, match=r"^DoRA's update is not additive; merge it with merge_adapter\(\)\.$"):
        adapter.delta_weight()
    message = r"^this DoRA adapter was not merged by this process; nothing to unmerge\.$"
    with pytest.raises(peftlab.AdapterStateError, match=message):
        adapter.unmerge_from(layer.base_layer)  # never merged
    assert torch.equal(layer.base_layer.weight, w)
    model.merge_adapter()
    assert not torch.equal(layer.base_layer.weight, w)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w)
    with pytest.raises(peftlab.AdapterStateError, match=message):
        adapter.unmerge_from(layer.base_layer)  # already unmerged: the factor is gone

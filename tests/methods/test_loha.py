"""LoHa: the contract table plus hand-computed checks of the Hadamard update."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import peftlab
from peftlab import LoHaConfig, PeftConfigError, TargetModuleError, get_peft_model
from _contract import Case, contract_tests, conv_inputs
from conftest import ConvNet, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().LoHaConfig(init_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: LoHaConfig(init_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value", "dense"])
LLAMA = dict(task_type="CAUSAL_LM", r=3, alpha=5, target_modules="all-linear", rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})
CONV = dict(r=2, alpha=3, target_modules=["conv", "pointwise", "lin"])
CONV_EFF = dict(CONV, use_effective_conv2d=True)

T5 = dict(task_type="SEQ_2_SEQ_LM", r=2, alpha=4, target_modules=["q", "v", "wo"])

CASES = {
    "bert-qv-dense": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT)),
    "llama-all-linear-patterns": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA)),
    "convnet-flat": Case(ConvNet, conv_inputs, _ours(**CONV), _peft(**CONV)),
    "convnet-effective-conv2d": Case(ConvNet, conv_inputs, _ours(**CONV_EFF), _peft(**CONV_EFF)),
    "t5-seq2seq": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5)),
}
globals().update(contract_tests(CASES))


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x)


def test_delta_is_scaled_hadamard_product():
    torch.manual_seed(0)
    net = OneLinear()
    x = torch.randn(3, 5)
    w, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model = get_peft_model(net, LoHaConfig(r=2, alpha=6, target_modules=["lin"], init_weights=False))
    ad = model.get_base_model().lin.adapters["default"]
    assert ad.hada_w1_a.shape == (4, 2) and ad.hada_w1_b.shape == (2, 5)
    delta = (ad.hada_w1_a @ ad.hada_w1_b) * (ad.hada_w2_a @ ad.hada_w2_b) * (6 / 2)
    torch.testing.assert_close(model(x), x @ (w + delta.detach()).T + b)


def test_effective_conv2d_shapes_and_kernel():
    torch.manual_seed(0)
    model = get_peft_model(ConvNet(), LoHaConfig(r=2, target_modules=["conv", "pointwise"], use_effective_conv2d=True, init_weights=False))
    conv = model.get_base_model().conv.adapters["default"]
    assert conv.hada_t1.shape == (2, 2, 3, 3) and conv.hada_w1_a.shape == (2, 8) and conv.hada_w1_b.shape == (2, 3)
    # a 1x1 conv has no spatial kernel to factor: it is flattened like a linear layer
    point = model.get_base_model().pointwise.adapters["default"]
    assert not hasattr(point, "hada_t1") and point.hada_w1_a.shape == (8, 2)
    k1 = torch.einsum("ijkl,ip,jq->pqkl", conv.hada_t1, conv.hada_w1_a, conv.hada_w1_b)
    k2 = torch.einsum("ijkl,ip,jq->pqkl", conv.hada_t2, conv.hada_w2_a, conv.hada_w2_b)
    torch.testing.assert_close(conv.delta_weight(), k1 * k2 * conv.scaling)


def test_rank_can_exceed_r():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoHaConfig(r=2, target_modules=["lin"], init_weights=False))
    delta = model.get_base_model().lin.adapters["default"].delta_weight().detach()
    assert torch.linalg.matrix_rank(delta) > 2  # r^2 = 4 reachable, LoRA r=2 would stop at 2


def test_module_dropout_skips_adapter_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoHaConfig(r=2, target_modules=["lin"], init_weights=False, module_dropout=0.999999))
    x = torch.randn(2, 5)
    model.train()
    with torch.no_grad():
        base_out = model.get_base_model().lin.base_layer(x)
        torch.testing.assert_close(model(x), base_out)
        model.eval()
        assert not torch.allclose(model(x), base_out)


def test_bad_config_and_target():
    with pytest.raises(PeftConfigError, match="r must be a positive integer"):
        LoHaConfig(r=0)
    with pytest.raises(PeftConfigError, match="rank_dropout"):
        LoHaConfig(rank_dropout=1.5)
    with pytest.raises(TargetModuleError, match="Conv1D"):
        get_peft_model(tiny_gpt2(), LoHaConfig(target_modules=["c_attn"]))


def test_config_json_roundtrip(tmp_path):
    cfg = LoHaConfig(r=4, alpha=2.5, target_modules=["q"], use_effective_conv2d=True, rank_pattern={"q": 2})
    cfg.save_pretrained(tmp_path)
    again = peftlab.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, LoHaConfig) and again == cfg

"""LoKr: the contract table plus hand-computed checks of the Kronecker update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import LoKrConfig, PeftConfigError, get_peft_model
from peftlab.functional import factorization
from _contract import Case, contract_tests, conv_inputs
from conftest import ConvNet, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_llama, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().LoKrConfig(init_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: LoKrConfig(init_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value", "dense"])
# r=1 with decompose_both: both factors become rank-1 products on the 32x32 / 48x32 layers.
LLAMA = dict(task_type="CAUSAL_LM", r=1, alpha=2, target_modules="all-linear", decompose_both=True,
             rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 3})
LLAMA_FACTOR = dict(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "down_proj"], decompose_factor=4)
CONV = dict(r=1, alpha=3, target_modules=["conv", "pointwise", "lin"])
CONV_FULL = dict(r=4, target_modules=["conv", "pointwise"])
CONV_EFF = dict(r=1, target_modules=["conv", "pointwise"], use_effective_conv2d=True)

T5 = dict(task_type="SEQ_2_SEQ_LM", r=2, alpha=4, target_modules=["q", "v", "wo"])

CASES = {
    "bert-qv-dense": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT)),
    "llama-decompose-both-patterns": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA)),
    "llama-decompose-factor": Case(tiny_llama, text_inputs, _ours(**LLAMA_FACTOR), _peft(**LLAMA_FACTOR)),
    "convnet-low-rank-w2": Case(ConvNet, conv_inputs, _ours(**CONV), _peft(**CONV)),
    "convnet-full-w2": Case(ConvNet, conv_inputs, _ours(**CONV_FULL), _peft(**CONV_FULL)),
    "convnet-effective-conv2d": Case(ConvNet, conv_inputs, _ours(**CONV_EFF), _peft(**CONV_EFF)),
    "t5-seq2seq": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5)),
}
globals().update(contract_tests(CASES))


class OneLinear(nn.Module):
    def __init__(self, n_in: int = 6, n_out: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def test_delta_is_scaled_kronecker_product():
    torch.manual_seed(0)
    net = OneLinear()
    x = torch.randn(3, 6)
    w, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model = get_peft_model(net, LoKrConfig(r=2, alpha=6, target_modules=["lin"], init_weights=False))
    ad = model.get_base_model().lin.adapters["default"]
    # out 8 = 2 * 4, in 6 = 2 * 3: w1 (2, 2), w2 (4, 3) stored in full since r >= max(4, 3) / 2
    assert ad.lokr_w1.shape == (2, 2) and ad.lokr_w2.shape == (4, 3)
    w1, w2 = ad.lokr_w1.detach(), ad.lokr_w2.detach()
    delta = torch.zeros(8, 6)
    for i in range(2):
        for j in range(2):
            delta[i * 4:(i + 1) * 4, j * 3:(j + 1) * 3] = w1[i, j] * w2
    torch.testing.assert_close(model(x), x @ (w + delta * 3).T + b)


def test_low_rank_factor_when_rank_is_small():
    model = get_peft_model(OneLinear(16, 64), LoKrConfig(r=1, target_modules=["lin"], decompose_both=True))
    ad = model.get_base_model().lin.adapters["default"]
    # out 64 = 8 * 8, in 16 = 4 * 4; w1 (8, 4) would be full, but r=1 < 8/2 so it is factored too
    assert ad.lokr_w1_a.shape == (8, 1) and ad.lokr_w1_b.shape == (1, 4)
    assert ad.lokr_w2_a.shape == (8, 1) and ad.lokr_w2_b.shape == (1, 4)
    torch.testing.assert_close(ad.lokr_w1_a, torch.zeros(8, 1))  # identity init zeroes w1


@pytest.mark.parametrize("dim,factor,expected", [(64, -1, (8, 8)), (48, -1, (6, 8)), (37, -1, (1, 37)), (64, 4, (4, 16)), (48, 5, (4, 12))])
def test_factorization(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_factorization_matches_peft():
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 7, 16):
            assert factorization(dim, factor) == lokr_layer.factorization(dim, factor), (dim, factor)


def test_lycoris_init_zeroes_w2():
    model = get_peft_model(OneLinear(), LoKrConfig(r=2, target_modules=["lin"], init_weights="lycoris"))
    ad = model.get_base_model().lin.adapters["default"]
    assert torch.count_nonzero(ad.lokr_w2) == 0 and torch.count_nonzero(ad.lokr_w1) > 0


def test_bad_config():
    with pytest.raises(PeftConfigError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(PeftConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)

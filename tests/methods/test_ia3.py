"""IA3: the contract table (identity at init, merge, save/load, training, peft parity) plus
hand-computed scaling, merge/unmerge through a full model and the feed-forward rules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab import IA3Config, get_peft_model
from _contract import Case, contract_tests
from conftest import main_output, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama


def _peft(**kwargs):
    import peft

    return lambda: peft.IA3Config(init_ia3_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: IA3Config(init_ia3_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS")
GPT2 = dict(task_type="CAUSAL_LM", fan_in_fan_out=True)
LLAMA = dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj", "up_proj"])

CASES = {
    "bert-defaults": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT)),
    "gpt2-conv1d-defaults": Case(tiny_gpt2, text_inputs, _ours(**GPT2), _peft(**GPT2)),
    "llama-two-feedforward": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA)),
}
globals().update(contract_tests(CASES))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 6)
        self.ff = nn.Linear(6, 3)

    def forward(self, x):
        return self.ff(torch.tanh(self.attn(x)))


def test_hand_computed_scaling():
    torch.manual_seed(0)
    net = Block()
    x = torch.randn(2, 4)
    model = get_peft_model(net, IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"], init_ia3_weights=False))
    l_attn = model.get_base_model().attn.adapters["default"].ia3_l.detach()  # (6, 1)
    l_ff = model.get_base_model().ff.adapters["default"].ia3_l.detach()  # (1, 6)
    assert l_attn.shape == (6, 1) and l_ff.shape == (1, 6)
    base = model.get_base_model()
    hidden = torch.tanh(base.attn.base_layer(x) * l_attn.flatten())
    expected = base.ff.base_layer(hidden * l_ff.flatten())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("build", [tiny_bert_cls, tiny_gpt2, tiny_llama])
def test_identity_merge_unmerge(build):
    torch.manual_seed(0)
    base = build().eval()
    inputs = text_inputs()
    with torch.no_grad():
        expected = main_output(base(**inputs))
        model = get_peft_model(copy.deepcopy(base), IA3Config()).eval()
        torch.testing.assert_close(main_output(model(**inputs)), expected)
        for name, p in model.named_parameters():
            if ".ia3_l." in name:
                p.uniform_(0.5, 1.5)
        unmerged = main_output(model(**inputs))
        assert not torch.allclose(unmerged, expected)
        model.merge_adapter()
        torch.testing.assert_close(main_output(model(**inputs)), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(main_output(model(**inputs)), unmerged, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(main_output(model(**inputs)), expected, atol=1e-5, rtol=1e-5)


def test_feedforward_must_be_target():
    with pytest.raises(peftlab.PeftConfigError, match="feedforward_modules"):
        IA3Config(target_modules=["key"], feedforward_modules=["output.dense"])


def test_default_feedforward_follows_explicit_targets():
    model = get_peft_model(tiny_bert_cls(), IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert model.peft_config["default"].feedforward_modules == []
    shapes = {n: p.shape for n, p in model.named_parameters() if "ia3_l" in n}
    assert shapes and all(s[1] == 1 for s in shapes.values())


def test_mixed_batch_with_feedforward_adapters():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), IA3Config(init_ia3_weights=False), "x").eval()
    inputs = text_inputs(batch=2)
    with torch.no_grad():
        adapted = main_output(model(**inputs))
        plain = main_output(base(**inputs))
        mixed = main_output(model(**inputs, adapter_names=["x", "__base__"]))
    torch.testing.assert_close(mixed[0], adapted[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], plain[1], atol=1e-5, rtol=1e-5)

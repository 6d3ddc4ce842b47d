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
from conftest import main_output, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().IA3Config(init_ia3_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: IA3Config(init_ia3_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS")
GPT2 = dict(task_type="CAUSAL_LM", fan_in_fan_out=True)
LLAMA = dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj", "up_proj"])

T5 = dict(task_type="SEQ_2_SEQ_LM")

CASES = {
    "bert-defaults": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT)),
    "gpt2-conv1d-defaults": Case(tiny_gpt2, text_inputs, _ours(**GPT2), _peft(**GPT2)),
    "llama-two-feedforward": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA)),
    "t5-seq2seq-defaults": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5)),
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


# ----- references without peft: Conv2d, biases, dtypes, default resolution ------------------------
class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Conv2d(3, 5, 3, padding=1)
        self.ff = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.ff(torch.tanh(self.attn(x)))


def test_conv2d_scales_output_channels_or_input_channels_and_merges_exactly():
    torch.manual_seed(0)
    model = get_peft_model(ConvBlock().double(), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"], init_ia3_weights=False))
    base = model.get_base_model()
    l_attn = base.attn.adapters["default"].ia3_l.detach()
    l_ff = base.ff.adapters["default"].ia3_l.detach()
    assert l_attn.shape == (1, 5, 1, 1) and l_ff.shape == (1, 5, 1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    hidden = torch.tanh(base.attn.base_layer(x) * l_attn)  # each output channel (bias included) scaled
    expected = base.ff.base_layer(hidden * l_ff)  # each input channel scaled
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    weights = {n: p.detach().clone() for n, p in base.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(base.attn.base_layer.weight, weights["attn.base_layer.weight"] * l_attn.view(5, 1, 1, 1))
    torch.testing.assert_close(base.attn.base_layer.bias, weights["attn.base_layer.bias"] * l_attn.flatten())
    torch.testing.assert_close(base.ff.base_layer.weight, weights["ff.base_layer.weight"] * l_ff)
    torch.testing.assert_close(base.ff.base_layer.bias, weights["ff.base_layer.bias"])  # input scaling leaves the bias
    model.unmerge_adapter()
    for name, value in weights.items():
        torch.testing.assert_close(dict(base.named_parameters())[name], value, rtol=1e-7, atol=0)


def test_linear_merge_scales_rows_and_bias_or_columns_only():
    torch.manual_seed(0)
    model = get_peft_model(Block().double(), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"], init_ia3_weights=False))
    base = model.get_base_model()
    l_attn = base.attn.adapters["default"].ia3_l.detach()  # (6, 1)
    l_ff = base.ff.adapters["default"].ia3_l.detach()  # (1, 6)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(base.attn.base_layer.weight, before["attn.base_layer.weight"] * l_attn)
    torch.testing.assert_close(base.attn.base_layer.bias, before["attn.base_layer.bias"] * l_attn.flatten())
    torch.testing.assert_close(base.ff.base_layer.weight, before["ff.base_layer.weight"] * l_ff)
    torch.testing.assert_close(base.ff.base_layer.bias, before["ff.base_layer.bias"])


def test_unmerge_of_a_zero_entry_stays_finite():
    model = get_peft_model(Block().double(), IA3Config(target_modules=["attn"], feedforward_modules=[]))
    base = model.get_base_model()
    with torch.no_grad():
        base.attn.adapters["default"].ia3_l[2] = 0.0
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.isfinite(base.attn.base_layer.weight).all() and torch.isfinite(base.attn.base_layer.bias).all()
    assert (base.attn.base_layer.weight[2] == 0).all()  # the scaled-away row cannot come back; it must not be NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_keep_their_dtype(dtype):
    torch.manual_seed(0)
    model = get_peft_model(Block().to(dtype), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"], init_ia3_weights=False))
    base = model.get_base_model()
    assert base.attn.adapters["default"].ia3_l.dtype == torch.float32  # the vectors train in fp32
    x = torch.randn(2, 4, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    l_attn = base.attn.adapters["default"].ia3_l.detach().flatten().to(dtype)
    l_ff = base.ff.adapters["default"].ia3_l.detach().flatten().to(dtype)
    expected = base.ff.base_layer(torch.tanh(base.attn.base_layer(x) * l_attn) * l_ff)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_default_feedforward_resolution():
    from peftlab.methods.ia3.ia3 import resolve_ia3_config

    class Unknown(nn.Module):
        config = type("C", (), {"model_type": "not-a-model"})()

    config = resolve_ia3_config(IA3Config(target_modules=["a"]), Unknown())
    assert config.feedforward_modules == []
    llama = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    assert llama.peft_config["default"].feedforward_modules == ["down_proj"]
    assert llama.get_base_model().model.layers[0].mlp.down_proj.adapters["default"].ia3_l.shape[0] == 1  # (1, in)
    regex = resolve_ia3_config(IA3Config(target_modules=r".*(k_proj|down_proj)"), tiny_llama())
    assert regex.feedforward_modules == ["down_proj"]  # a regex target keeps the model type's defaults
    explicit = resolve_ia3_config(IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"]), tiny_llama())
    assert explicit.feedforward_modules == ["k_proj"]  # given: left alone


def test_gpt2_defaults_scale_conv1d_output_and_input_by_hand():
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2().double(), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    block = model.get_base_model().transformer.h[0]
    c_attn, c_proj = block.attn.c_attn, block.mlp.c_proj
    assert c_attn.adapters["default"].ia3_l.shape == (96, 1) and c_proj.adapters["default"].ia3_l.shape == (1, 128)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    h = torch.randn(2, 3, 128, dtype=torch.float64)
    torch.testing.assert_close(c_attn(x), c_attn.base_layer(x) * c_attn.adapters["default"].ia3_l.flatten())
    torch.testing.assert_close(c_proj(h), c_proj.base_layer(h * c_proj.adapters["default"].ia3_l.flatten()))
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    block_m = merged.get_base_model().transformer.h[0]
    torch.testing.assert_close(block_m.attn.c_attn(x), c_attn(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(block_m.mlp.c_proj(h), c_proj(h), rtol=0, atol=1e-12)


def test_unsupported_layer_names_the_layer_and_the_supported_kinds():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)

    with pytest.raises(peftlab.TargetModuleError, match=r"IA3 cannot adapt emb \(Embedding\); it adapts nn\.Linear, Conv1D and nn\.Conv2d\."):
        get_peft_model(WithEmbedding(), IA3Config(target_modules=["emb"]))


def test_feedforward_modules_given_as_a_set_or_tuple_are_stored_sorted():
    assert IA3Config(target_modules=["b", "a", "c"], feedforward_modules={"c", "a"}).feedforward_modules == ["a", "c"]
    assert IA3Config(target_modules=["b", "a"], feedforward_modules=("b", "a")).feedforward_modules == ["a", "b"]

"""LoraConfig validation, bias training, and how LoRA builds its layer adapters: the exact messages
(each names the field, the bad value and the fix), the accepted edge values, and hand-checked
parameter sets. No peft needed."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab import LoraConfig, get_peft_model
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.methods.lora.lora import lora_bias_parameters
from conftest import tiny_bert_cls, tiny_gpt2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "LoraConfig: r must be a positive integer, got 0; try r=8."),
        (dict(r=True), "LoraConfig: r must be a positive integer, got True; try r=8."),
        (dict(lora_alpha=True), "LoraConfig: lora_alpha must be a finite number, got True."),
        (dict(lora_alpha="8"), "LoraConfig: lora_alpha must be a finite number, got '8'."),
        (dict(lora_alpha=float("inf")), "LoraConfig: lora_alpha must be a finite number, got inf."),
        (dict(lora_alpha=1e39, r=4), "LoraConfig: lora_alpha / r gives a scale of 2.5e+38"),
        (dict(lora_alpha=1e39, r=4, use_rslora=True), "LoraConfig: lora_alpha / r gives a scale of 5e+38"),
        (dict(lora_dropout=1.0), "LoraConfig: lora_dropout must be in [0, 1), got 1.0."),
        (dict(lora_dropout=True), "LoraConfig: lora_dropout must be in [0, 1), got True."),
        (dict(lora_dropout="0.1"), "LoraConfig: lora_dropout must be in [0, 1), got '0.1'."),
        (dict(bias="some"), "LoraConfig: bias must be 'none', 'all' or 'lora_only', got 'some'."),
        (dict(init_lora_weights="loftq"), "LoraConfig: init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora' or 'orthogonal', got 'loftq'."),
        (dict(rank_pattern=[("q", 2)]), "LoraConfig: rank_pattern must be a dict of module-name regex -> value, got [('q', 2)]."),
        (dict(alpha_pattern=3), "LoraConfig: alpha_pattern must be a dict of module-name regex -> value, got 3."),
        (dict(rank_pattern={"(": 2}), "LoraConfig: pattern key '(' is not a valid regular expression (missing ), unterminated subpattern at position 0)."),
        (dict(alpha_pattern={"q": True}), "LoraConfig: alpha_pattern['q'] must be a finite number, got True."),
        (dict(alpha_pattern={"q": "2"}), "LoraConfig: alpha_pattern['q'] must be a finite number, got '2'."),
        (dict(alpha_pattern={"q": float("nan")}), "LoraConfig: alpha_pattern['q'] must be a finite number, got nan."),
        (dict(alpha_pattern={"q": 1e39}), "LoraConfig: alpha_pattern['q'] / r gives a scale of 1e+39"),
        (dict(rank_pattern={"q": 0}), "LoraConfig: rank_pattern['q'] must be a positive integer, got 0."),
        (dict(rank_pattern={"q": True}), "LoraConfig: rank_pattern['q'] must be a positive integer, got True."),
        (dict(rank_pattern={"q": 2.0}), "LoraConfig: rank_pattern['q'] must be a positive integer, got 2.0."),
    ],
)
def test_invalid_config_says_which_field_and_value(kwargs, message):
    if kwargs.get("lora_alpha") == 1e39 and not kwargs.get("use_rslora"):
        LoraConfig(**kwargs)  # 1e39 / 4 = 2.5e38 fits float32 (max 3.4e38): accepted without rsLoRA
        return
    with pytest.raises(PeftConfigError, match="^" + re.escape(message)):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(bias="all"), dict(bias="lora_only"), dict(init_lora_weights="gaussian"), dict(init_lora_weights=False),
     dict(lora_dropout=0.0), dict(lora_dropout=0.99), dict(lora_dropout=0), dict(rank_pattern={"q": 1}),
     dict(alpha_pattern={"q": 0.5}), dict(lora_alpha=16.5)],
)
def test_edge_values_are_accepted(kwargs):
    LoraConfig(**kwargs)


def _bias_model(bias: str) -> peftlab.PeftModel:
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], bias=bias))
    model.add_adapter("other", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key"], bias=bias))
    return model


def test_bias_all_trains_every_bias_but_the_heads_copies():
    model = _bias_model("all")
    base = model.get_base_model()
    expected = {
        n for n, _ in base.named_parameters()
        if n.endswith(".bias") and ".lora_" not in n and "classifier" not in n  # the head trains whole (modules_to_save)
    }
    got = set(lora_bias_parameters(base, model.peft_config["default"], "default"))
    assert got == expected and "bert.encoder.layer.0.attention.self.key.base_layer.bias" in got
    assert "bert.encoder.layer.0.output.dense.bias" in got and "bert.embeddings.LayerNorm.bias" in got


def test_bias_lora_only_trains_the_biases_of_that_adapters_layers():
    model = _bias_model("lora_only")
    base = model.get_base_model()
    got = lora_bias_parameters(base, model.peft_config["default"], "default")
    assert set(got) == {f"bert.encoder.layer.{i}.attention.self.{m}.base_layer.bias" for i in range(2) for m in ("query", "value")}
    assert all(p is base.get_submodule(n.rsplit(".", 1)[0]).bias for n, p in got.items())
    other = lora_bias_parameters(base, model.peft_config["other"], "other")
    assert set(other) == {f"bert.encoder.layer.{i}.attention.self.key.base_layer.bias" for i in range(2)}
    assert lora_bias_parameters(base, LoraConfig(bias="none"), "default") == {}


def test_grouped_conv_and_unsupported_layers_are_refused_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(4, 4, 3, groups=2)
            self.norm = nn.LayerNorm(4)

    with pytest.raises(TargetModuleError, match=re.escape("LoRA: grouped is a grouped Conv2d (groups=2); exclude it.")):
        get_peft_model(Net(), LoraConfig(r=2, target_modules=["grouped"]))
    with pytest.raises(TargetModuleError, match=re.escape("LoRA cannot adapt norm (LayerNorm); it adapts nn.Linear, Conv1D, nn.Embedding and nn.Conv2d.")):
        get_peft_model(Net(), LoraConfig(r=2, target_modules=["norm"]))


def test_too_large_rank_names_the_module():
    with pytest.raises(PeftConfigError, match=re.escape("LoRA: r=100 for bert.encoder.layer.0.attention.self.query exceeds both sides")):
        get_peft_model(tiny_bert_cls(), LoraConfig(r=100, target_modules=["query"]))


def test_conv1d_gets_fan_in_fan_out_with_a_warning_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ours = [w for w in caught if "fan_in_fan_out" in str(w.message)]
    # this file: the user's line (under mutation testing, mutmut's trampoline sits between the two)
    assert ours and all(w.filename == __file__ or f"{os.sep}mutmut{os.sep}" in w.filename for w in ours)
    assert len(ours) == 1  # the config is corrected at the first Conv1D, as peft does
    assert str(ours[0].message) == (
        "LoRA: fan_in_fan_out=False but Conv1D stores its weight as (in, out); setting fan_in_fan_out=True in the config."
    )
    assert model.peft_config["default"].fan_in_fan_out is True
    c_attn = model.get_base_model().transformer.h[0].attn.c_attn
    adapter = c_attn.adapters["default"]
    assert adapter.fan_in_fan_out is True
    delta = adapter.delta_weight()
    assert delta.shape == c_attn.base_layer.weight.shape == (32, 96)  # (in, out), as Conv1D stores it
    torch.testing.assert_close(delta, (adapter.lora_B.weight @ adapter.lora_A.weight).T * adapter.scaling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], fan_in_fan_out=True))
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == [
        "LoRA: fan_in_fan_out=True but Linear stores its weight as (out, in); setting fan_in_fan_out=False in the config."
    ]
    assert model.peft_config["default"].fan_in_fan_out is False


def test_bias_lora_only_skips_adapted_layers_without_a_bias():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["word_embeddings", "query"], bias="lora_only"))
    got = lora_bias_parameters(model.get_base_model(), model.peft_config["default"], "default")
    assert set(got) == {f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)}  # the embedding has none


def test_delta_weight_has_the_base_weights_layout():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["intermediate.dense"], init_lora_weights=False))
    dense = model.get_base_model().bert.encoder.layer[0].intermediate.dense
    adapter = dense.adapters["default"]
    delta = adapter.delta_weight()
    assert delta.shape == dense.base_layer.weight.shape == (37, 32)  # (out, in) for nn.Linear: not transposed
    torch.testing.assert_close(delta, adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling)


# ----- layer adapters: initialisation and the Conv2d / Embedding arguments -------------------------
from peftlab.methods.lora.layers import LoraConv2d, LoraEmbedding, LoraLinear  # noqa: E402


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_init_modes(kind):
    torch.manual_seed(0)
    make = (lambda: LoraLinear(256, 64, r=32, scaling=1.0, dropout=0.0, fan_in_fan_out=False)) if kind == "linear" else (
        lambda: LoraConv2d(nn.Conv2d(16, 64, 4), r=32, scaling=1.0, dropout=0.0))
    fan_in = 256 if kind == "linear" else 16 * 4 * 4

    default = make()
    default.reset(True)  # A kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in); B zero
    a = default.lora_A.weight
    assert a.abs().max() <= fan_in**-0.5 and a.abs().max() > 0.95 * fan_in**-0.5
    assert not default.lora_B.weight.any()

    gaussian = make()
    gaussian.reset("gaussian")  # A ~ N(0, (1/r)^2)
    assert abs(gaussian.lora_A.weight.std().item() - 1 / 32) < 0.1 / 32 and gaussian.lora_A.weight.abs().max() > fan_in**-0.5
    assert not gaussian.lora_B.weight.any()

    untouched = make()
    before = [p.detach().clone() for p in untouched.parameters()]
    untouched.reset(False)
    assert all(torch.equal(p, q) for p, q in zip(untouched.parameters(), before)) and untouched.lora_B.weight.any()


def test_conv2d_adapter_follows_the_base_geometry():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2).double()
    adapter = LoraConv2d(base, r=2, scaling=0.5, dropout=0.0).double()
    adapter.reset(False)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = base(x) + 0.5 * nn.functional.conv2d(
        nn.functional.conv2d(x, adapter.lora_A.weight, stride=2, padding=2, dilation=2), adapter.lora_B.weight)
    torch.testing.assert_close(adapter.adapt_output(x, base(x)), expected, rtol=0, atol=1e-12)
    assert adapter.lora_B.kernel_size == (1, 1) and adapter.lora_B.stride == (1, 1) and adapter.lora_B.bias is None


def test_embedding_adapter_keeps_the_lookup_options():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0, max_norm=None, scale_grad_by_freq=True)
    adapter = LoraEmbedding(base, r=3, scaling=2.0)
    adapter.reset(False)
    ids = torch.tensor([[0, 1, 1, 2]])
    out = adapter.adapt_output(ids, base(ids))
    expected = base(ids) + 2.0 * adapter.lora_embedding_A.T[ids] @ adapter.lora_embedding_B.T
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    grad = adapter.lora_embedding_A.grad  # (r, num): column i belongs to token i
    assert not grad[:, 0].any()  # padding_idx: no gradient
    ref = torch.zeros_like(adapter.lora_embedding_A)
    rows = adapter.lora_embedding_B.sum(0) * 2.0  # d out.sum() / d A[:, i] per occurrence
    ref[:, 1] = rows  # token 1 twice, scaled by 1 / frequency 2
    ref[:, 2] = rows
    torch.testing.assert_close(grad, ref)
    assert adapter.lora_embedding_A.shape == (3, 10) and adapter.lora_embedding_B.shape == (4, 3)
    adapter.reset(True)
    assert not adapter.lora_embedding_A.any() and adapter.lora_embedding_B.any()


def test_linear_adapter_parts_and_mixed_batch_factors():
    plain = LoraLinear(12, 10, r=4, scaling=0.5, dropout=0.0, fan_in_fan_out=False)
    assert [n for n, _ in plain.named_parameters()] == ["lora_A.weight", "lora_B.weight"]  # no biases
    assert plain.lora_A.weight.shape == (4, 12) and plain.lora_B.weight.shape == (10, 4)
    assert isinstance(plain.lora_dropout, nn.Identity) and plain.scaling == 0.5 and plain.fan_in_fan_out is False
    dropped = LoraLinear(12, 10, r=4, scaling=0.5, dropout=0.25, fan_in_fan_out=True)
    assert isinstance(dropped.lora_dropout, nn.Dropout) and dropped.lora_dropout.p == 0.25 and dropped.fan_in_fan_out is True
    a, b, s = plain.low_rank_factors()
    assert a is plain.lora_A.weight and b is plain.lora_B.weight and s == 0.5
    dropped.train()
    assert dropped.low_rank_factors() is None  # dropout in effect: rows cannot share one stacked product
    dropped.eval()
    assert dropped.low_rank_factors() is not None


def test_conv2d_adapter_dropout_module():
    base = nn.Conv2d(3, 6, 3)
    assert isinstance(LoraConv2d(base, r=2, scaling=1.0, dropout=0.0).lora_dropout, nn.Identity)
    dropped = LoraConv2d(base, r=2, scaling=1.0, dropout=0.5).lora_dropout
    assert isinstance(dropped, nn.Dropout) and dropped.p == 0.5

"""LoRA: the contract table (identity at init, merge, save/load, training, peft parity) plus
hand-computed outputs, merge_and_unload, disable and mixed batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab import LoraConfig, get_peft_model
from _contract import Case, contract_tests, conv_inputs
from conftest import ConvNet, main_output, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().LoraConfig(init_lora_weights=False, **kwargs)


def _ours(**kwargs):
    return lambda identity: LoraConfig(init_lora_weights=identity, **kwargs)


BERT = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")
GPT2 = dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # wte: tied, see below
LLAMA = dict(task_type="CAUSAL_LM", r=3, lora_alpha=5, target_modules="all-linear", rank_pattern={"v_proj": 2}, use_rslora=True)
CONV = dict(r=2, lora_alpha=3, target_modules=["conv", "lin", "emb"])
LORA_BIAS_CONV = dict(r=2, lora_alpha=3, target_modules=["conv", "lin"], lora_bias=True)  # embeddings take no lora_bias
# Inits that read the base weight (tests/methods/test_lora_init.py has their own checks): the factors
# start non-zero, so the rows perturb them to get an adapter that changes the output.
PISSA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
OLORA = dict(GPT2, init_lora_weights="olora")
ORTHOGONAL = dict(PISSA, init_lora_weights="orthogonal", target_modules=["q_proj", "v_proj", "down_proj"])


def _init_rows(kwargs):
    """(ours, theirs) factories for an init that is its own identity: the same config either way."""

    def theirs():
        import peft  # (when the row runs: the module must collect without peft)

        return peft.LoraConfig(**kwargs)

    return (lambda identity: LoraConfig(**kwargs)), theirs

T5 = dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v", "wo"])

CASES = {
    "bert-all-linear": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT)),
    "gpt2-conv1d": Case(tiny_gpt2, text_inputs, _ours(**GPT2), _peft(**GPT2)),
    "llama-rslora-pattern": Case(tiny_llama, text_inputs, _ours(**LLAMA), _peft(**LLAMA)),
    "convnet": Case(ConvNet, conv_inputs, _ours(**CONV), _peft(**CONV)),
    "t5-seq2seq": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5)),
    "llama-pissa": Case(tiny_llama, text_inputs, *_init_rows(PISSA), perturb=True),
    # peft < 0.22 builds OLoRA factors for GPT-2's Conv1D from the transposed weight (shapes swapped)
    "gpt2-olora": Case(tiny_gpt2, text_inputs, *_init_rows(OLORA), perturb=True, peft_min="0.22"),
    "llama-orthogonal": Case(tiny_llama, text_inputs, *_init_rows(ORTHOGONAL), perturb=True),
    "gpt2-lora-bias": Case(tiny_gpt2, text_inputs, _ours(**GPT2, lora_bias=True), _peft(**GPT2, lora_bias=True)),
    "convnet-lora-bias": Case(ConvNet, conv_inputs, _ours(**LORA_BIAS_CONV), _peft(**LORA_BIAS_CONV)),
}
globals().update(contract_tests(CASES))


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def run(model, inputs):
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    net = TwoLinear()
    x = torch.randn(2, 5)
    w, bias = net.a.weight.detach().clone(), net.a.bias.detach().clone()
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["a"], init_lora_weights=False))
    adapter = model.get_base_model().a.adapters["default"]
    a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    hidden = x @ w.T + bias + (x @ a.T @ b.T) * (6 / 2)
    expected = net.b(torch.relu(hidden))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("r", [2, 3, 8, 16])  # not 4: there sqrt(r) == r / 2, so 2 * alpha / r would pass
def test_rslora_scaling(r):
    from peftlab.functional import lora_scaling

    assert lora_scaling(r, 8, use_rslora=True) == pytest.approx(8 / math.sqrt(r))
    assert lora_scaling(r, 8, use_rslora=False) == pytest.approx(8 / r)
    # the layer's output at these ranks: tests/test_references.py::test_lora_output_and_merge_match_hand_computation


def test_rank_and_alpha_pattern():
    model = get_peft_model(TwoLinear(), LoraConfig(r=4, target_modules=["a", "b"], rank_pattern={"b": 2}, alpha_pattern={"b": 6}))
    adapter_b = model.get_base_model().b.adapters["default"]
    assert adapter_b.lora_A.weight.shape == (2, 4)
    assert adapter_b.scaling == pytest.approx(3.0)
    assert model.get_base_model().a.adapters["default"].lora_A.weight.shape == (4, 5)


@pytest.mark.parametrize("build,targets", [(tiny_bert_cls, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "wte"])])
def test_merged_equals_unmerged_and_unmerge_restores(build, targets):
    torch.manual_seed(0)
    base = build().eval()
    inputs = text_inputs()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    unmerged = run(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    merged_model = model.merge_and_unload()
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged_model.named_modules())
    torch.testing.assert_close(run(merged_model, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_conv2d_and_embedding_merge():
    torch.manual_seed(0)
    net = ConvNet().eval()
    x, ids = torch.randn(2, 3, 6, 6), torch.randint(0, 20, (2, 4))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["conv", "pointwise", "emb"], init_lora_weights=False))
    with torch.no_grad():
        unmerged = model(x, ids)
        model.merge_adapter()
        torch.testing.assert_close(model(x, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_disable_adapter_gives_base_output():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    inputs = text_inputs()
    expected = run(base, inputs)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert not torch.allclose(run(model, inputs), expected)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), expected)
    assert not torch.allclose(run(model, inputs), expected)


def test_disable_while_merged_is_refused():
    model = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["a"]))
    model.merge_adapter()
    with pytest.raises(peftlab.AdapterStateError, match="unmerge_adapter"), model.disable_adapter():
        pass


def test_unload_restores_original_weights():
    torch.manual_seed(0)
    base = TwoLinear()
    original = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    assert isinstance(plain.a, nn.Linear)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key])


def test_multiple_adapters_set_delete_and_mixed_batch():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    inputs = text_inputs(batch=4)
    out_a = run(model, inputs)
    model.set_adapter("b")
    out_b = run(model, inputs)
    with model.disable_adapter():
        out_base = run(model, inputs)
    with torch.no_grad():
        mixed = main_output(model(**inputs, adapter_names=["a", "b", "__base__", "b"]))
    torch.testing.assert_close(mixed[0], out_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], out_b[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], out_base[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[3], out_b[3], atol=1e-5, rtol=1e-5)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.b.weight", ".lora_B.b.weight")) for n in trainable)
    with pytest.raises(peftlab.AdapterStateError, match="unknown adapters"):
        model(**inputs, adapter_names=["a", "zzz", "a", "a"])
    model.delete_adapter("b")
    assert model.active_adapter == "a"
    torch.testing.assert_close(run(model, inputs), out_a)


def test_mixed_batch_generate():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = text_inputs(batch=2)["input_ids"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, adapter_names=["default", "__base__"])
        adapted = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
        plain = base.generate(input_ids=ids[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(mixed[0], adapted[0])
    assert torch.equal(mixed[1], plain[0])


def test_safe_merge_refuses_non_finite():
    model = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["a"]))
    before = model.get_base_model().a.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.get_base_model().a.adapters["default"].lora_B.weight.fill_(float("nan"))
    with pytest.raises(peftlab.AdapterStateError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model.get_base_model().a.base_layer.weight, before)


def test_modules_to_save_and_seq_cls_head_trainable():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    assert model.peft_config["default"].modules_to_save == ["classifier"]


def test_all_linear_skips_output_head():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model.get_base_model().lm_head, nn.Linear)
    assert "lora_A" in dict(model.get_base_model().named_modules()).get("model.layers.0.mlp.down_proj").__dict__["_modules"]


def test_gradients_reach_only_adapters():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    model.train()
    inputs = text_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_lora_bias_forward_and_merge_by_hand():
    """lora_bias=True: out = W x + b + s (B A x + b_B); merging adds s b_B to the base bias."""
    torch.manual_seed(0)
    net = TwoLinear()
    x = torch.randn(2, 5)
    w, bias = net.a.weight.detach().clone(), net.a.bias.detach().clone()
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, target_modules=["a"], lora_bias=True, init_lora_weights=False))
    adapter = model.get_base_model().a.adapters["default"]
    a, b, b_b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach(), adapter.lora_B.bias.detach()
    assert adapter.lora_B.bias.requires_grad
    hidden = x @ w.T + bias + (x @ a.T @ b.T + b_b) * 3.0
    expected = net.b(torch.relu(hidden))
    torch.testing.assert_close(model(x), expected)
    model.merge_adapter()
    torch.testing.assert_close(model.get_base_model().a.base_layer.bias, bias + 3.0 * b_b)
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model().a.base_layer.bias, bias)


def test_lora_bias_refusals():
    with pytest.raises(peftlab.PeftConfigError, match="lora_bias"):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(peftlab.PeftConfigError, match="lora_bias"):
        LoraConfig(lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(peftlab.TargetModuleError, match="embeddings"):
        get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["lin", "emb"], lora_bias=True))
    # a layer without a bias: the adapter trains, but a merge is refused before any layer changes
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no bias"):
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(peftlab.AdapterStateError, match="no bias|has none"):
        model.merge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(w.merged_adapters for _, w in peftlab.layers.iter_wrappers(model.get_base_model()))

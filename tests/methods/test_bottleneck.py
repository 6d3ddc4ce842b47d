"""Bottleneck adapters: generic checks over tiny models, a hand-written BERT layer as reference,
placement defaults, adapter management, Trainer, and bad input.

Hugging Face peft has no bottleneck adapter, so there are no parity tests; the reference is
``test_houlsby_matches_hand_written_bert_layer``.
"""

from __future__ import annotations

import copy
import re
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab import AdapterStateError, BottleneckConfig, PeftConfigError, PeftModel, TargetModuleError, get_peft_model
from _contract import Case, check_identity_at_init, check_only_adapter_parameters_change, check_save_load_roundtrip, run
from conftest import (
    main_output,
    seq2seq_inputs,
    text_inputs,
    tiny_bart,
    tiny_bert_cls,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_t5,
    tiny_vit,
)


def image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def _ours(**kwargs):
    return lambda identity: BottleneckConfig(init_weights=identity, **kwargs)


CASES = {
    "bert-houlsby": Case(tiny_bert_cls, text_inputs, _ours(task_type="SEQ_CLS")),
    "bert-pfeiffer-gelu": Case(tiny_bert_cls, text_inputs, _ours(placement="pfeiffer", non_linearity="gelu", reduction_factor=4)),
    "roberta-houlsby": Case(tiny_roberta, text_inputs, _ours(task_type="SEQ_CLS", bottleneck_size=3)),
    "distilbert-houlsby": Case(tiny_distilbert, text_inputs, _ours(task_type="SEQ_CLS", non_linearity="swish")),
    "gpt2-houlsby": Case(tiny_gpt2, text_inputs, _ours(task_type="CAUSAL_LM", reduction_factor=8)),
    "llama-pfeiffer": Case(tiny_llama, text_inputs, _ours(task_type="CAUSAL_LM", placement="pfeiffer", bottleneck_size=4)),
    "vit-houlsby": Case(tiny_vit, image_inputs, _ours(reduction_factor=8)),
    "t5-houlsby": Case(tiny_t5, seq2seq_inputs, _ours(reduction_factor=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init(case):
    check_identity_at_init(CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_roundtrip(case, tmp_path):
    check_save_load_roundtrip(CASES[case], tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_only_adapter_parameters_change(case):
    check_only_adapter_parameters_change(CASES[case])


def adapted_names(model: PeftModel) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, peftlab.layers.LayerWrapper)]


@pytest.mark.parametrize(
    "build, houlsby, pfeiffer",
    [
        (tiny_bert_cls, ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
         ["bert.encoder.layer.{i}.output.dense"]),
        (tiny_roberta, ["roberta.encoder.layer.{i}.attention.output.dense", "roberta.encoder.layer.{i}.output.dense"],
         ["roberta.encoder.layer.{i}.output.dense"]),
        (tiny_distilbert, ["distilbert.transformer.layer.{i}.attention.out_lin", "distilbert.transformer.layer.{i}.ffn.lin2"],
         ["distilbert.transformer.layer.{i}.ffn.lin2"]),
        (tiny_gpt2, ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"], ["transformer.h.{i}.mlp.c_proj"]),
        (tiny_llama, ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"], ["model.layers.{i}.mlp.down_proj"]),
    ],
)
def test_default_placement_targets(build, houlsby, pfeiffer):
    expand = lambda names: [n.format(i=i) for i in range(2) for n in names]  # noqa: E731 - two blocks per tiny model
    model = get_peft_model(build(), BottleneckConfig(placement="houlsby"))
    assert adapted_names(model) == expand(houlsby)
    model = get_peft_model(build(), BottleneckConfig(placement="pfeiffer"))
    assert adapted_names(model) == expand(pfeiffer)


def test_vit_and_seq2seq_defaults():
    vit = adapted_names(get_peft_model(tiny_vit(), BottleneckConfig()))
    assert len(vit) == 4 and all(n.endswith(("o_proj", "fc2", "output.dense")) for n in vit)
    t5 = adapted_names(get_peft_model(tiny_t5(), BottleneckConfig(placement="pfeiffer")))
    assert t5 == [f"{s}.block.{i}.layer.{j}.DenseReluDense.wo" for s, j in (("encoder", 1), ("decoder", 2)) for i in range(2)]
    bart = adapted_names(get_peft_model(tiny_bart(), BottleneckConfig()))
    assert bart == [
        "model.encoder.layers.0.self_attn.out_proj", "model.encoder.layers.0.fc2",
        "model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.encoder_attn.out_proj", "model.decoder.layers.0.fc2",
    ]


def test_houlsby_matches_hand_written_bert_layer():
    """Layer 0 of a tiny BERT with Houlsby adapters, computed from its weights by hand."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), BottleneckConfig(non_linearity="swish", reduction_factor=4, init_weights=False))
    model.eval()
    inputs = text_inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    x, expected = out.hidden_states[0], out.hidden_states[1]

    layer = model.get_base_model().bert.encoder.layer[0]
    att, ffn_out = layer.attention, layer.output

    def weights(wrapper):
        return wrapper.base_layer.weight, wrapper.base_layer.bias, wrapper.adapters["default"]

    def adapter(h, a):
        z = h @ a.adapter_down.weight.T + a.adapter_down.bias
        z = z * torch.sigmoid(z)  # swish
        return h + z @ a.adapter_up.weight.T + a.adapter_up.bias

    def layer_norm(h, ln):
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    with torch.no_grad():
        heads, dh = 4, 8
        def split(t):
            return t.view(*t.shape[:2], heads, dh).transpose(1, 2)
        q = split(x @ att.self.query.weight.T + att.self.query.bias)
        k = split(x @ att.self.key.weight.T + att.self.key.bias)
        v = split(x @ att.self.value.weight.T + att.self.value.bias)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(x.shape)
        w, b, a = weights(att.output.dense)
        attn_out = layer_norm(adapter(context @ w.T + b, a) + x, att.output.LayerNorm)
        inter = attn_out @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias
        inter = 0.5 * inter * (1 + torch.erf(inter / math.sqrt(2)))  # exact GELU
        w, b, a = weights(ffn_out.dense)
        manual = layer_norm(adapter(inter @ w.T + b, a) + attn_out, ffn_out.LayerNorm)
    torch.testing.assert_close(manual, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        base_hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
    assert not torch.allclose(base_hidden, expected, atol=1e-3), "the random adapter must change layer 0"


def test_trainable_count_and_shapes():
    model = get_peft_model(tiny_gpt2(), BottleneckConfig(reduction_factor=4))
    d, m = 32, 8  # Conv1D c_proj: output 32, bottleneck 32 // 4
    per_adapter = d * m + m + m * d + d
    assert model.get_nb_trainable_parameters()[0] == 4 * per_adapter
    ad = model.get_base_model().transformer.h[0].attn.c_proj.adapters["default"]
    assert ad.adapter_down.weight.shape == (m, d) and ad.adapter_up.weight.shape == (d, m)
    sized = get_peft_model(tiny_bert_cls(), BottleneckConfig(bottleneck_size=5, task_type="SEQ_CLS"))
    classifier = 32 * 3 + 3
    assert sized.get_nb_trainable_parameters()[0] == 4 * (32 * 5 + 5 + 5 * 32 + 32) + classifier


def test_up_projection_starts_at_zero_and_gets_gradients():
    model = get_peft_model(tiny_bert_cls(), BottleneckConfig())
    ad = model.get_base_model().bert.encoder.layer[1].output.dense.adapters["default"]
    assert torch.count_nonzero(ad.adapter_up.weight) == 0 and torch.count_nonzero(ad.adapter_up.bias) == 0
    assert torch.count_nonzero(ad.adapter_down.weight) > 0
    main_output(model(**text_inputs())).pow(2).mean().backward()
    assert ad.adapter_up.weight.grad.abs().sum() > 0


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x):
        return self.lin(x)


def test_dropout_acts_on_adapter_input_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), BottleneckConfig(target_modules=["lin"], bottleneck_size=3, adapter_dropout=0.999999, init_weights=False))
    ad = model.get_base_model().lin.adapters["default"]
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = model.get_base_model().lin.base_layer(x)
        model.train()  # (almost) every input unit dropped: the adapter sees zeros
        torch.testing.assert_close(model(x), h + ad.adapter_up(torch.relu(ad.adapter_down.bias)).expand_as(h))
        model.eval()
        torch.testing.assert_close(model(x), h + ad.adapter_up(torch.relu(ad.adapter_down(h))))


def test_merge_raises_and_leaves_model_working():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), BottleneckConfig(init_weights=False))
    inputs = text_inputs()
    before = run(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(AdapterStateError, match="cannot be folded"):
            call()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(run(model, inputs), before)


def test_disable_and_unload_give_base_outputs():
    torch.manual_seed(0)
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(init_weights=False))
    inputs = text_inputs()
    adapted = run(model, inputs)
    assert not torch.allclose(adapted, run(base, inputs), atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(base, inputs))
    torch.testing.assert_close(run(model, inputs), adapted)
    plain = model.unload()
    assert not adapted_names_in(plain)
    torch.testing.assert_close(run(plain, inputs), run(base, inputs))


def adapted_names_in(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, peftlab.layers.LayerWrapper)]


def test_two_adapters_set_adapter_save_and_load(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(init_weights=False))
    model.add_adapter("pf", BottleneckConfig(placement="pfeiffer", bottleneck_size=6, init_weights=False))
    inputs = text_inputs()
    out_default = run(model, inputs)
    model.set_adapter("pf")
    out_pf = run(model, inputs)
    assert not torch.allclose(out_default, out_pf, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.adapter_(down|up)\.pf\.(weight|bias)$", n) for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "pf" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "pf", "pf")
    torch.testing.assert_close(run(loaded, inputs), out_default)
    loaded.set_adapter("pf")
    torch.testing.assert_close(run(loaded, inputs), out_pf)
    model.delete_adapter("default")
    assert len(adapted_names(model)) == 2  # Pfeiffer: the two feed-forward outputs remain


def test_checkpoint_layout(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_bert_cls(), BottleneckConfig(placement="pfeiffer", bottleneck_size=2))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.bert.encoder.layer.{i}.output.dense.adapter_{p}.{t}"
        for i in range(2) for p in ("down", "up") for t in ("weight", "bias")
    }
    config = peftlab.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, BottleneckConfig) and config.placement == "pfeiffer" and config.inference_mode


def test_config_json_roundtrip(tmp_path):
    cfg = BottleneckConfig(placement="pfeiffer", reduction_factor=2.5, non_linearity="gelu", adapter_dropout=0.1, target_modules=["fc2"])
    cfg.save_pretrained(tmp_path)
    assert peftlab.PeftConfig.from_pretrained(tmp_path) == cfg


def test_works_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from test_trainer import ToyTask

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), BottleneckConfig(task_type="SEQ_CLS", reduction_factor=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = ToyTask()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=10, learning_rate=2e-2,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert last < first * 0.8, (first, last)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".adapter_up." in n for n in changed) and any(".adapter_down." in n for n in changed)
    assert all(re.search(r"\.adapter_(down|up)\.default\.", n) or "classifier.modules_to_save.default" in n for n in changed), changed


# ----- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(placement="middle"), "placement"),
        (dict(non_linearity="tanh"), "non_linearity"),
        (dict(reduction_factor=4, bottleneck_size=8), "not both"),
        (dict(reduction_factor=0), "reduction_factor"),
        (dict(bottleneck_size=2.5), "bottleneck_size"),
        (dict(adapter_dropout=1.0), "adapter_dropout"),
        (dict(init_weights="yes"), "init_weights"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(PeftConfigError, match=message):
        BottleneckConfig(**kwargs)


def snapshot(model: nn.Module):
    return [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()], [type(m) for m in model.modules()]


def assert_untouched(model: nn.Module, snap) -> None:
    params, types = snap
    assert [type(m) for m in model.modules()] == types
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _, _ in params]
    assert all(torch.equal(p.detach(), v) and p.requires_grad == g for (_, p), (_, v, g) in zip(now, params))


def test_unknown_architecture_lists_candidates():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    snap = snapshot(net)
    with pytest.raises(TargetModuleError) as err:
        get_peft_model(net, BottleneckConfig())
    message = str(err.value)
    assert "no default adapter placement" in message and "full names: 0, 2" in message and "bert" in message
    assert_untouched(net, snap)


def test_bottleneck_too_small_leaves_model_untouched():
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(PeftConfigError, match="leaves no bottleneck"):
        get_peft_model(model, BottleneckConfig(reduction_factor=64))
    assert_untouched(model, snap)


def test_non_linear_target_rejected():
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(TargetModuleError, match="linear output projections"):
        get_peft_model(model, BottleneckConfig(target_modules=["output.dense", "LayerNorm"]))
    assert_untouched(model, snap)


def test_mixed_batch_rows_use_their_adapter():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), BottleneckConfig(init_weights=False))
    model.add_adapter("b", BottleneckConfig(init_weights=False))
    inputs = text_inputs(batch=3)
    model.eval()
    with torch.no_grad():
        mixed = main_output(model(**inputs, adapter_names=["default", "b", "__base__"]))
        a = run(model, inputs)
        model.set_adapter("b")
        b = run(model, inputs)
        with model.disable_adapter():
            base = run(model, inputs)
    torch.testing.assert_close(mixed, torch.stack([a[0], b[1], base[2]]), atol=1e-5, rtol=1e-5)
    assert F.mse_loss(a, b) > 1e-6


def test_layers_to_transform_with_default_targets(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(layers_to_transform=[1], init_weights=False))
    assert adapted_names(model) == ["bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    inputs = text_inputs()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert adapted_names(loaded) == adapted_names(model)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs))

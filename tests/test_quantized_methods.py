"""Every method on a 4-bit and an 8-bit bitsandbytes base: it works (forward, a train step, merge
where the method merges) or it refuses the base with a clear error before touching the model.

The base layer's kind is read through :mod:`peftlab.base_layer`, so a method that works on
``nn.Linear`` must work on the packed layers too; this table is what proves it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import registry
from peftlab.errors import AdapterStateError, TargetModuleError
from peftlab.quantization import QuantConfig, is_quantized_linear, quantize_model
from conftest import text_inputs, tiny_llama

pytest.importorskip("bitsandbytes")

QUANT = {"nf4": QuantConfig(bits=4, quant_type="nf4"), "int8": QuantConfig(bits=8)}
TARGETS = ["q_proj", "v_proj", "down_proj"]

# method -> (config, merges): configs start at identity, so the wrapped model equals its base.
METHODS = {
    "lora": (lambda: peftlab.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS), True),
    "ia3": (lambda: peftlab.IA3Config(task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=["down_proj"]), True),
    "loha": (lambda: peftlab.LoHaConfig(task_type="CAUSAL_LM", r=2, target_modules=TARGETS), True),
    "lokr": (lambda: peftlab.LoKrConfig(task_type="CAUSAL_LM", r=2, target_modules=TARGETS), True),
    "adalora": (
        lambda: peftlab.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, target_modules=TARGETS),
        True,
    ),
    "bottleneck": (lambda: peftlab.BottleneckConfig(task_type="CAUSAL_LM", target_modules=["o_proj", "down_proj"]), False),
    "prompt_tuning": (lambda: peftlab.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), False),
    "prefix_tuning": (lambda: peftlab.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), False),
    "p_tuning": (lambda: peftlab.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8), False),
    "selective": (lambda: peftlab.SelectiveConfig(task_type="CAUSAL_LM", layer_norm=True), False),
    "vera": (lambda: peftlab.VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=TARGETS), True),
    "oft": (lambda: peftlab.OFTConfig(task_type="CAUSAL_LM", oft_block_size=8, target_modules=TARGETS), True),
    # its rows live in the embedding, which stays unquantized: its merge is tested in test_trainable_tokens.py
    "trainable_tokens": (lambda: peftlab.TrainableTokensConfig(task_type="CAUSAL_LM", token_indices=[3, 10, 56]), False),
}
PROMPT = {"prompt_tuning", "prefix_tuning", "p_tuning"}


def quantized(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return quantize_model(tiny_llama().eval(), QUANT[name]).eval()


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_table_covers_every_registered_method():
    assert {m.lower() for m in registry.registered_methods()} == set(METHODS)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_on_quantized_base(method, quant):
    make_config, _ = METHODS[method]
    base = quantized(quant)
    inputs = text_inputs(batch=2, length=6)
    expected = logits(base, inputs)
    model = peftlab.get_peft_model(copy.deepcopy(base), make_config())
    out = logits(model, inputs)
    if method in PROMPT:  # virtual tokens lengthen the sequence; they change the output by design
        assert torch.isfinite(out).all()
    else:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # identity at init
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    assert trainable
    model.train()
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainable.items()), "nothing trained"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{n} is frozen but changed"
    packed = [m for m in model.modules() if is_quantized_linear(m)]
    assert len(packed) == sum(is_quantized_linear(m) for m in base.modules())  # still packed


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", [m for m, (_, merges) in METHODS.items() if merges])
def test_method_merges_into_quantized_base(method, quant):
    """Merging re-quantizes W + dW: the merged model keeps most of the adapter's effect.

    The bound: re-quantizing changes each weight by at most half a step of its 4-/8-bit grid, far
    less than an update of the weights' own size, so the merged output must sit much closer to
    the unmerged one than the base does.
    """
    make_config, _ = METHODS[method]
    base = quantized(quant)
    inputs = text_inputs(batch=2, length=6)
    model = peftlab.get_peft_model(copy.deepcopy(base), make_config())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an update as large as the weights themselves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    reference, unmerged = logits(base, inputs), logits(model, inputs)
    effect = float((unmerged - reference).norm())
    assert effect > 0
    model.merge_adapter()
    merged = logits(model, inputs)
    assert float((merged - unmerged).norm()) < 0.5 * effect
    assert all(
        is_quantized_linear(layer.base_layer)
        for layer in model.modules()
        if isinstance(layer, peftlab.layers.LayerWrapper)
    )
    model.unmerge_adapter()
    assert float((logits(model, inputs) - unmerged).norm()) < 0.5 * effect


@pytest.mark.parametrize("quant", list(QUANT))
def test_bottleneck_refuses_to_merge_on_quantized_base(quant):
    make_config, _ = METHODS["bottleneck"]
    model = peftlab.get_peft_model(quantized(quant), make_config())
    with pytest.raises(AdapterStateError, match="cannot be folded"):
        model.merge_adapter()


@pytest.mark.parametrize("quant", list(QUANT))
def test_dora_refuses_quantized_base(quant):
    base = quantized(quant)
    with pytest.raises(TargetModuleError, match="DoRA cannot adapt .*quantized"):
        peftlab.get_peft_model(base, peftlab.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert not any(p.requires_grad for p in base.parameters())  # untouched


@pytest.mark.parametrize("quant", list(QUANT))
def test_selective_refuses_packed_weights(quant):
    base = quantized(quant)
    with pytest.raises(TargetModuleError, match="quantized layers .*cannot be trained"):
        peftlab.get_peft_model(base, peftlab.SelectiveConfig(last_n_layers=1))
    assert not any(p.requires_grad for p in base.parameters())

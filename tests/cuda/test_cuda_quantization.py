"""QLoRA on bitsandbytes' CUDA 4-bit (NF4, FP4 with double quantization) and 8-bit layers: train,
save, reload, merge, and the delta node beside a packed base (tests/test_quantization.py runs the
same on bitsandbytes' CPU kernels).

The tiny Llama here is 64 wide (128 in the MLP): bitsandbytes' CUDA kernels are exercised with
the 64-weight blocks real models use.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _cuda import device, on  # noqa: F401  (the fixture)
from conftest import text_inputs
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.quantization import QuantConfig, dequantize_weight, is_quantized_linear, quantize_model

pytestmark = pytest.mark.cuda
bnb = pytest.importorskip("bitsandbytes")

CONFIGS = {
    "nf4": QuantConfig(bits=4, quant_type="nf4"),
    "fp4-double": QuantConfig(bits=4, quant_type="fp4", double_quant=True),
    "nf4-bf16-compute": QuantConfig(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16),
    "int8": QuantConfig(bits=8),
}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def quantized(name: str, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the fp32 model on the device, the same weights quantized there: bitsandbytes packs in ``.to(device)``)."""
    torch.manual_seed(seed)
    full = _llama().to(device).eval()
    quant = quantize_model(copy.deepcopy(full), CONFIGS[name]).eval()
    layer = quant.model.layers[0].self_attn.q_proj
    assert is_quantized_linear(layer) and layer.weight.device.type == device.type
    return full, quant


def _lora(**kw) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", **kw)


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_layers_compute_their_dequantized_weight(device, name):
    """Each packed layer multiplies by what dequantize_weight reads back (to the rounding of its compute
    dtype, and for int8 of its activations), and that weight is the fp32 one to within the format's error."""
    full, quant = quantized(name, device)
    layer, plain = quant.model.layers[0].mlp.up_proj, full.model.layers[0].mlp.up_proj
    x = torch.randn(5, 64, device=device)
    w = dequantize_weight(layer)
    assert w.device.type == device.type
    rel_weight = float((w - plain.weight.detach()).norm() / plain.weight.detach().norm())
    assert 0 < rel_weight < (0.15 if CONFIGS[name].bits == 4 else 0.02)
    with torch.no_grad():
        out, expected = layer(x).float(), x @ w.t() + (0 if layer.bias is None else layer.bias)
    # int8 also rounds the activations to 8 bits per row (~1/127 of the row's largest |x|); bf16 compute rounds operands (2**-8)
    rel = float((out - expected).norm() / expected.norm())
    assert rel < (0.05 if CONFIGS[name].bits == 8 else 0.02)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_trains_saves_reloads_and_merges(device, tmp_path, name, dropout):
    _, quant = quantized(name, device)
    twin = copy.deepcopy(quant)
    model = get_peft_model(quant, _lora(lora_dropout=dropout))
    inputs = on(device, text_inputs(batch=4, length=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    trained = _logits(model, inputs)
    with model.disable_adapter():
        base = _logits(model, inputs)
    assert float((trained - base).abs().max()) > 1e-3

    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(twin, tmp_path)
    assert torch.equal(_logits(again, inputs), trained)

    merged = again.merge_and_unload()  # dequantized: plain fp32 layers holding deq(W) + s B A
    assert not any(is_quantized_linear(m) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.device.type == device.type
    effect = float((trained - base).norm())
    # 4-bit: the same weights in another order of operations; int8: the unmerged model also rounds activations
    tolerance = 1e-3 if CONFIGS[name].bits == 4 and CONFIGS[name].compute_dtype == torch.float32 else 0.1
    assert float((_logits(merged, inputs) - trained).norm()) <= tolerance * max(effect, float(trained.norm()))


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_merge_adapter_keeps_the_base_quantized(device, name):
    _, quant = quantized(name, device)
    model = get_peft_model(quant, _lora(init_lora_weights=False))
    inputs = on(device, text_inputs())
    unmerged = _logits(model, inputs)
    with model.disable_adapter():
        base = _logits(model, inputs)
    model.merge_adapter()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer.weight, bnb.nn.Params4bit if name == "nf4" else bnb.nn.Int8Params)
    assert layer.weight.device.type == device.type
    assert float((_logits(model, inputs) - unmerged).norm()) < 0.5 * float((unmerged - base).norm())


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_dropout_beside_a_packed_base_goes_through_the_delta_node(device, name):
    _, quant = quantized(name, device)
    model = get_peft_model(quant, _lora(lora_dropout=0.2, init_lora_weights=False)).train()
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, 64, device=device, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = q_proj(x)
    names, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    assert "LoraDeltaFunctionBackward" in names
    input_sized = [t for t in saved if t.is_floating_point() and t.numel() >= x.numel() and t.dtype == x.dtype]
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in input_sized)
    out.float().sum().backward()
    assert x.grad is not None and q_proj.lora_A["default"].weight.grad.abs().sum() > 0


def test_peft_adapter_on_our_4bit_base_gives_peft_outputs(device, tmp_path):
    peft = pytest.importorskip("peft")
    _, quant = quantized("nf4", device)
    twin = copy.deepcopy(quant)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(quant, tmp_path)
    inputs = on(device, text_inputs())
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=1e-4)

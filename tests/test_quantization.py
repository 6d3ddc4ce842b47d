"""QLoRA: 4-/8-bit frozen bases (bitsandbytes on CPU), LoRA on top, merging, parity with peft."""

from __future__ import annotations

import builtins
import copy
import warnings

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.errors import QuantizationError
from peftlab.quantization import (
    QuantConfig,
    dequantize_weight,
    is_quantized_linear,
    prepare_model_for_kbit_training,
    quantize_model,
    weight_bytes,
)
from conftest import text_inputs, tiny_llama, peft_oracle

bnb = pytest.importorskip("bitsandbytes")

CONFIGS = {
    "nf4": QuantConfig(bits=4, quant_type="nf4"),
    "fp4-double": QuantConfig(bits=4, quant_type="fp4", double_quant=True),
    "int8": QuantConfig(bits=8),
}


def quantized_llama(config: QuantConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(fp32 tiny Llama, the same weights quantized)."""
    torch.manual_seed(seed)
    full = tiny_llama().eval()
    return full, quantize_model(copy.deepcopy(full), config).eval()


def lora_config(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_replaces_linears_and_stays_close(name):
    full, quant = quantized_llama(CONFIGS[name])
    kind = bnb.nn.Linear4bit if CONFIGS[name].bits == 4 else bnb.nn.Linear8bitLt
    layers = {n: m for n, m in quant.named_modules() if isinstance(m, nn.Linear)}
    assert isinstance(quant.lm_head, nn.Linear) and not is_quantized_linear(quant.lm_head)  # head kept
    assert all(isinstance(m, kind) for n, m in layers.items() if n != "lm_head")
    w_full = full.model.layers[0].self_attn.q_proj.weight.detach()
    w_deq = dequantize_weight(quant.model.layers[0].self_attn.q_proj)
    rel = float((w_deq - w_full).norm() / w_full.norm())
    assert rel < (0.15 if CONFIGS[name].bits == 4 else 0.02)
    assert rel > 0  # it really is quantized
    inputs = text_inputs()
    torch.manual_seed(1)
    unrelated = tiny_llama().eval()
    with torch.no_grad():
        a, b, c = full(**inputs).logits, quant(**inputs).logits, unrelated(**inputs).logits
    # Each layer's output moves by about its weights' relative error and the residual stream does not
    # amplify it (measured: logits 0.06 / 0.09 / 0.005 for weights 0.09 / 0.12 / 0.005), so the logits
    # stay within the weight bound; a random model with other weights is off by ~1.4.
    bound = 0.15 if CONFIGS[name].bits == 4 else 0.02
    assert float((b - a).norm() / a.norm()) < bound
    assert float((c - a).norm() / a.norm()) > 5 * bound  # uncorrelated logits: ~sqrt(2); the check tells models apart
    ratio = weight_bytes(full) / weight_bytes(quant)
    assert ratio > (3.0 if CONFIGS[name].bits == 4 else 2.0)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"pip install peftlab\[quant\]"):
        quantize_model(model, QuantConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_quantized_model_from_folder(tmp_path):
    from peftlab.quantization import load_quantized_model

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    model = load_quantized_model(str(tmp_path), QuantConfig(bits=8))
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert not any(p.requires_grad for p in model.parameters())


def test_loaded_model_owns_its_memory_and_keeps_tied_weights(tmp_path):
    # load_quantized_model copies the full-precision parameters out of the safetensors mapping;
    # the copies must be the same numbers, and tied embeddings must stay one parameter.
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from peftlab.quantization import load_quantized_model, quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    loaded = load_quantized_model(str(tmp_path), QuantConfig()).eval()
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(str(tmp_path)), QuantConfig()).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
    references = dict(reference.named_parameters())
    file_backed = _mapped_from(tmp_path / "model.safetensors")
    for name, param in loaded.named_parameters():
        assert torch.equal(param, references[name]), name
        if file_backed is not None:  # Linux: no parameter may still live in the file's mapping
            assert not any(lo <= param.data_ptr() < hi for lo, hi in file_backed), name


def _mapped_from(path) -> list[tuple[int, int]] | None:
    """Address ranges of this process mapped from ``path`` (None where /proc is not there)."""
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_bad_quant_config():
    with pytest.raises(QuantizationError, match="bits"):
        QuantConfig(bits=3)
    with pytest.raises(QuantizationError, match="quant_type"):
        QuantConfig(quant_type="int4")


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_lora_on_quantized_base_trains_only_adapters(name):
    _, quant = quantized_llama(CONFIGS[name])
    model = get_peft_model(quant, lora_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(0)
    inputs = text_inputs(batch=4, length=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert is_quantized_linear(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_lora_dropout_on_quantized_base_keeps_only_the_input(name):
    """With dropout on a packed base, the adapter term goes through peftlab's delta node (the mask
    drawn again from its seed in backward): nothing input-sized is kept for a layer but its input,
    where ``nn.Dropout`` + ``lora_A`` would keep a dropped copy and a mask per layer."""
    _, quant = quantized_llama(CONFIGS[name])
    model = get_peft_model(quant, lora_config(lora_dropout=0.2, init_lora_weights=False)).train()
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, q_proj.base_layer.in_features, requires_grad=True)
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
    input_sized = [t for t in saved if t.is_floating_point() and t.numel() >= x.numel()]
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in input_sized)
    out.sum().backward()
    assert x.grad is not None and q_proj.lora_A["default"].weight.grad.abs().sum() > 0


def _peft_quantized_pair(init: bool):
    """Our LoRA and peft's LoRA on identical 4-bit copies of one model."""
    peft = peft_oracle()

    _, quant = quantized_llama(CONFIGS["nf4"])
    twin = copy.deepcopy(quant)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)  # peft took its bnb 4-bit path
    return quant, theirs


def test_peft_adapter_loads_on_our_4bit_base_with_same_outputs(tmp_path):
    quant, theirs = _peft_quantized_pair(init=False)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(quant, tmp_path)
    inputs = text_inputs()
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
        with theirs.disable_adapter():
            base = theirs(**inputs).logits
    assert (a - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_our_4bit_adapter_loads_in_peft_with_same_outputs(tmp_path):
    peft = peft_oracle()

    _, quant = quantized_llama(CONFIGS["nf4"])
    twin = copy.deepcopy(quant)
    ours = get_peft_model(quant, lora_config(init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_on_4bit(tmp_path):
    _, quant = quantized_llama(CONFIGS["nf4"])
    twin = copy.deepcopy(quant)
    ours = get_peft_model(quant, lora_config(init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(twin, tmp_path)
    inputs = text_inputs()
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, again(**inputs).logits)


def test_prepare_keeps_weights_quantized_and_norms_fp32():
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    quantize_model(model, QuantConfig(compute_dtype=torch.bfloat16))
    prepare_model_for_kbit_training(model)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight, bnb.nn.Params4bit)
    assert layer.self_attn.q_proj.weight.dtype == torch.uint8
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # every unquantized weight upcast, as in peft
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    model = get_peft_model(model, lora_config())
    model.train()
    inputs = text_inputs()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _trained_lora(quant: nn.Module, scale: float) -> PeftModel:
    model = get_peft_model(quant, lora_config(init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    return model


def test_merge_and_unload_dequantizes_exactly():
    _, quant = quantized_llama(CONFIGS["nf4"])
    model = _trained_lora(quant, 1.0)
    inputs = text_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    merged_model = model.merge_and_unload()
    assert not any(is_quantized_linear(m) for m in merged_model.modules())
    assert merged_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        merged = merged_model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_requantized_merge_measures_its_error(scale):
    _, quant = quantized_llama(CONFIGS["nf4"])
    model = _trained_lora(quant, scale)
    inputs = text_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    with pytest.warns(UserWarning, match="re-quantizing the merged weights changes the adapter's update"):
        merged_model = model.merge_and_unload(requantize=True)
    assert isinstance(merged_model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    errors = merged_model.peftlab_requantize_error
    assert set(errors) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    with torch.no_grad():
        merged = merged_model(**inputs).logits
    adapter_effect = float((unmerged - base).norm())
    requant_error = float((merged - unmerged).norm())
    # A small update sits below the NF4 grid step: re-quantizing loses most of it.
    if scale == 0.01:
        assert min(errors.values()) > 0.5
        assert requant_error > 0.5 * adapter_effect
    else:
        assert max(errors.values()) < 1.0
        assert requant_error < adapter_effect


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_merge_adapter_on_quantized_base_keeps_it_quantized(name):
    _, quant = quantized_llama(CONFIGS[name])
    model = _trained_lora(quant, 1.0)
    inputs = text_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer.weight, bnb.nn.Params4bit if name == "nf4" else bnb.nn.Int8Params)
    assert float((merged - unmerged).norm()) < 0.5 * float((unmerged - base).norm())  # the update mostly survives
    model.unmerge_adapter()
    with torch.no_grad():
        assert float((model(**inputs).logits - unmerged).norm()) < 0.5 * float((unmerged - base).norm())


def test_dora_on_quantized_base_is_refused():
    from peftlab.errors import TargetModuleError

    _, quant = quantized_llama(CONFIGS["nf4"])
    with pytest.raises(TargetModuleError, match="DoRA"):
        get_peft_model(quant, lora_config(use_dora=True))
    assert not any(p.requires_grad for p in quant.parameters())


def test_quantize_after_adapters_is_refused():
    model = get_peft_model(tiny_llama(), lora_config())
    with pytest.raises(QuantizationError, match="before adding adapters"):
        quantize_model(model.get_base_model(), QuantConfig())


def test_8bit_merge_and_unload_dequantizes():
    _, quant = quantized_llama(CONFIGS["int8"])
    model = _trained_lora(quant, 1.0)
    inputs = text_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged_model = model.merge_and_unload()
    with torch.no_grad():
        merged = merged_model(**inputs).logits
    # int8 matmul quantizes activations too, so unmerged (int8) and merged (fp32) differ slightly.
    torch.testing.assert_close(merged, unmerged, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("in_features", [32, 96, 160, 128])
def test_4bit_error_is_nf4_level_for_widths_that_are_not_multiples_of_64(in_features):
    # bitsandbytes' AVX512 CPU kernel misreads 64-blocks that straddle rows (25-40% error);
    # quantize_linear picks a block size that keeps every width at NF4's ~9%.
    from peftlab.quantization import quantize_linear

    torch.manual_seed(0)
    linear = nn.Linear(in_features, 64)
    with torch.no_grad():  # pretrained weights are near-normal; NF4 is built for them
        linear.weight.copy_(torch.randn(64, in_features) * 0.02)
    layer = quantize_linear(linear, QuantConfig(bits=4, quant_type="nf4"))
    w = linear.weight.detach()
    rel = float((dequantize_weight(layer) - w).norm() / w.norm())
    assert 0 < rel < 0.12
    x = torch.randn(5, in_features)
    with torch.no_grad():
        rel_out = float((layer(x) - linear(x)).norm() / linear(x).norm())
    assert rel_out < 0.15


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_is_read_in_its_own_layout(double_quant):
    """On AVX512-BF16 CPUs bitsandbytes repacks a transformers-loaded Linear4bit on its first no-grad
    eval forward. The repacking is pure tensor code, so it is applied here directly (on any CPU):
    dequantize_weight and spec_of read the layer back, and it equals the weight before repacking up
    to the bf16 rounding of its block scales (bf16's unit roundoff 2**-8 relative to a block's absmax;
    with double quantization the scales are quantized to 8 bits again on the way back, ~1/127)."""
    from peftlab.quantization import quantize_linear, spec_of

    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack 4-bit weights for a CPU kernel")
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = quantize_linear(linear, QuantConfig(bits=4, quant_type="nf4", double_quant=double_quant))
    before, spec = dequantize_weight(layer).clone(), spec_of(layer)
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu
    after = dequantize_weight(layer)
    assert not weight.quant_state.packing_format_for_cpu and spec_of(layer) == spec
    scale = before.abs().amax(dim=1, keepdim=True)  # a row's largest block absmax (NF4's codes reach +-1)
    bound = scale * (2.0 / 127 if double_quant else 2.0**-8)
    assert ((after - before).abs() <= bound).all()

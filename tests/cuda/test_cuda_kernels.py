"""The fused and delta LoRA nodes (peftlab.kernels) on CUDA: against float64 and the readable path in
fp32 / bf16 / fp16 and under autocast, dropout masks drawn again exactly in backward, the CUDA mask
generator, mixed batches and DoRA. The helpers are tests/test_kernels.py's, given device tensors.

Tolerances. A sum of ``n`` terms computed in a dtype of unit roundoff ``u`` (``2**-8`` bf16,
``2**-11`` fp16, ``2**-24`` fp32) is within ``(n - 1) u`` times the sum of the terms' absolute
values of the exact sum, whether the kernel accumulates in fp32 and rounds once (cuBLAS'
CUBLAS_COMPUTE_32F) or rounds partial sums in the low dtype (a reduced-precision split-K reduction,
some CPU kernels: measured up to ~9 u here on the CPU in fp16). So a result differs from the float64
result on the same rounded operands by at most ``(k + n) u`` times the sum of the absolute values
of every term behind it (:func:`test_kernels.abs_magnitudes`), with ``k`` the roundings of whole
results along the way (the loss weights, ``h = x A^T``, the dropout scale, the adapter term, the
base output, their sum, the scaling: ``k = 8``) and ``n`` the longest chain of sums: B's gradient
sums 12 features into h, then 15 rows (27).
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from _cuda import device, on  # noqa: F401  (the fixture)
from conftest import main_output, text_inputs, tiny_bert_cls, tiny_llama
from peftlab import kernels
from test_kernels import (
    DELTA_NODE,
    FUSED_NODE,
    _graph_names,
    abs_magnitudes,
    count_mask_draws,
    hooked_lora_net,
    layer,
    lora_net,
    run,
)

pytestmark = pytest.mark.cuda

UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROUNDINGS = 8
LONGEST_SUM = 12 + 15
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bound(dtype: torch.dtype, magnitudes: torch.Tensor) -> torch.Tensor:
    return (ROUNDINGS + LONGEST_SUM) * UNIT[dtype] * magnitudes


def _assert_within(values: dict, reference: dict, magnitudes: dict, dtype: torch.dtype, what: str) -> None:
    assert values.keys() == reference.keys()
    for key in values:
        error = (values[key].double() - reference[key].double()).abs()
        bound = _bound(dtype, magnitudes[key])
        assert (error <= bound).all(), f"{what} {key}: error {error.max():.3g} above the {dtype} bound {bound.max():.3g}"


def _pair(dtype: torch.dtype, dropout: float, hooked: bool, device: torch.device):
    """(the model in ``dtype``, the same rounded weights in float64), on ``device``."""
    low = (hooked_lora_net(dropout) if hooked else lora_net(dropout=dropout)).to(device=device, dtype=dtype)
    return low, copy.deepcopy(low).double()


def _outputs(model, x: torch.Tensor, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same mask seed for every run with this seed
    out, grads = run(model, x)
    return {"out": out, **grads}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_and_readable_paths_within_rounding_of_float64(monkeypatch, device, dtype):
    """Without dropout both paths compute ``x W^T + b + s x A^T B^T``: each within the derived bound of float64."""
    low, exact = _pair(dtype, 0.0, hooked=False, device=device)
    x = torch.randn(3, 5, 12, device=device).to(dtype)
    assert FUSED_NODE in _graph_names(low(x.clone().requires_grad_(True)))
    fused = _outputs(low, x)
    reference = _outputs(exact, x.double())
    magnitudes = abs_magnitudes(exact.eval(), x)
    _assert_within(fused, reference, magnitudes, dtype, "fused")
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    assert FUSED_NODE not in _graph_names(low(x.clone().requires_grad_(True)))
    _assert_within(_outputs(low, x), reference, magnitudes, dtype, "readable")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "delta"])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_nodes_with_dropout_within_rounding_of_float64_with_the_same_mask(device, dtype, hooked, p):
    """With dropout the node (fused, or the delta node beside a hooked base) in ``dtype`` and in float64
    draw the same mask from the same seed; the low-precision results stay within the bound of float64
    (magnitudes without the mask, times 1 / (1 - p): an upper bound of the masked terms)."""
    low, exact = _pair(dtype, p, hooked, device)
    low.train()
    exact.train()
    x = torch.randn(3, 5, 12, device=device).to(dtype)
    graph = _graph_names(low(x.clone().requires_grad_(True)))
    assert (DELTA_NODE if hooked else FUSED_NODE) in graph
    values = _outputs(low, x)
    reference = _outputs(exact, x.double())
    magnitudes = {k: v / (1 - p) for k, v in abs_magnitudes(copy.deepcopy(exact).eval(), x).items()}
    _assert_within(values, reference, magnitudes, dtype, "with dropout")
    unmasked = _outputs(copy.deepcopy(exact).eval(), x.double())
    assert not all(torch.allclose(unmasked[k], reference[k]) for k in reference)  # the mask really applied


@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.3])
def test_fused_under_autocast_is_the_formula_from_rounded_operands(device, low_dtype, dropout):
    """tests/test_kernels.py's autocast check on the device and in both autocast dtypes: the fused node computes
    ``x W^T + b + s B A drop(x)`` from operands rounded to the autocast dtype (16 products + 2 roundings)."""
    model = lora_net(dropout=dropout, dtype=torch.float32).to(device)
    model.train()
    wrapped = layer(model)
    adapter, base = wrapped.adapters["default"], wrapped.base_layer
    x = torch.randn(6, 12, device=device)
    torch.manual_seed(9)
    with torch.autocast(device.type, dtype=low_dtype):
        out = model(x.clone().requires_grad_(True))
    assert out.dtype == low_dtype and FUSED_NODE in _graph_names(out)
    torch.manual_seed(9)
    keep = (kernels.DropMask.draw((6, 12), dropout, device).keep().double() / (1 - dropout) if dropout
            else torch.ones(6, 12, dtype=torch.float64, device=device))
    low = lambda t: t.detach().to(low_dtype).double()  # noqa: E731
    a, b = low(adapter.lora_A.weight), low(adapter.lora_B.weight)
    ref = low(x) @ low(base.weight).T + low(base.bias) + adapter.scaling * ((low(x) * keep) @ a.T) @ b.T
    magnitude = (low(x).abs() @ low(base.weight).abs().T + low(base.bias).abs()
                 + adapter.scaling * ((low(x) * keep).abs() @ a.abs().T) @ b.abs().T)
    bound = (16 + 2) * UNIT[low_dtype] * magnitude
    assert ((out.double() - ref).abs() <= bound).all()
    out.float().sum().backward()  # and backward runs in the autocast dtype, gradients reaching the fp32 factors
    assert adapter.lora_A.weight.grad.dtype == torch.float32 and torch.isfinite(adapter.lora_B.weight.grad).all()


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "delta"])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_masks_are_drawn_again_exactly_in_backward(monkeypatch, device, hooked, p):
    """On CUDA every mask is a keep mask (drop positions are a CPU path) drawn twice from one seed,
    in forward and again in backward; output and gradients equal the formula with that mask (float64)."""
    model = (hooked_lora_net(p) if hooked else lora_net(dropout=p)).to(device)
    model.train()
    sparse = device.type == "cpu" and p <= 0.05  # the dry run on CPU takes the positions path for small p
    calls = count_mask_draws(monkeypatch)
    wrapped = layer(model)
    adapter = wrapped.adapters["default"]
    x = torch.randn(3, 5, 12, dtype=torch.float64, device=device)
    torch.manual_seed(123)
    out, grads = run(model, x)
    assert calls == ({"positions": 1, "keep": 0} if sparse else {"positions": 0, "keep": 2})
    torch.manual_seed(123)
    drop = kernels.DropMask.draw((15, 12), p, device)
    assert drop.sparse == sparse
    keep = drop.keep().view(3, 5, 12)
    xr = x.clone().requires_grad_(True)
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    ref = wrapped.base_layer(xr) + (xr * keep / (1 - p)) @ a.T @ b.T * adapter.scaling
    (ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype, device=device).view_as(ref)).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["x"], xr.grad, rtol=0, atol=1e-12)
    prefix = "base_model.model.lin."
    torch.testing.assert_close(grads[prefix + "lora_A.default.weight"], a.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[prefix + "lora_B.default.weight"], b.grad, rtol=0, atol=1e-12)
    assert not bool(keep.all())


def test_device_mask_words_follow_torch_manual_seed_and_are_fair_bits(device):
    """kernels.random_words on a non-CPU device: a torch generator of that device seeded from one CPU draw."""
    torch.manual_seed(3)
    words = kernels.random_words(50_000, device)
    assert words.device.type == device.type and words.dtype == torch.int64
    torch.manual_seed(3)
    assert torch.equal(words, kernels.random_words(50_000, device))
    assert not torch.equal(words, kernels.random_words(50_000, device))
    assert torch.equal(kernels.random_words(1000, device, seed=11), kernels.random_words(1000, device, seed=11))
    words = words.cpu()
    # every one of the 64 bits a fair coin (std of each mean ~0.0022 over 50k words)
    bit_means = torch.stack([((words >> i) & 1).double().mean() for i in range(64)])
    assert (bit_means - 0.5).abs().max() < 0.015
    mask = kernels.keep_mask((400, 500), 0.1, device)
    assert mask.device.type == device.type and abs(mask.float().mean().item() - 0.9) < 0.005  # 200k draws: std ~0.0007


@pytest.mark.parametrize("names", [["a", "b", "__base__", "c", "b", "a"], ["a", "a", "b", "b", "__base__", "c"]])
def test_mixed_batch_on_the_device_equals_each_row_alone(monkeypatch, device, names):
    """tests/test_kernels.py's mixed-batch check on the device: stacked and per-run kernels, then the readable path."""
    torch.manual_seed(0)
    model = peftlab.get_peft_model(
        tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", peftlab.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"], init_lora_weights=False))
    model.add_adapter("c", peftlab.LoraConfig(r=3, target_modules="all-linear", init_lora_weights=False, use_rslora=True))
    model = model.to(device).eval()
    inputs = on(device, text_inputs(batch=6))
    fast = main_output(model(**inputs, adapter_names=names))
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = main_output(model(**row))
        else:
            model.set_adapter(name)
            expected = main_output(model(**row))
        torch.testing.assert_close(fast[i : i + 1], expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    torch.testing.assert_close(main_output(model(**inputs, adapter_names=names)), fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dora_trains_on_the_device(device, autocast):
    """DoRA keeps the readable path (no fused node) and trains on the device, under autocast too:
    finite loss, every factor and the magnitude get a gradient, and the fp32 weights stay fp32."""
    torch.manual_seed(0)
    config = peftlab.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", use_dora=True, lora_dropout=0.1,
                                init_lora_weights=False)
    model = peftlab.get_peft_model(tiny_llama(), config).to(device).train()
    inputs = on(device, text_inputs(batch=2, length=8))
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(**inputs, labels=inputs["input_ids"])
    assert FUSED_NODE not in _graph_names(out.loss) and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("magnitude" in n for n in trainable)
    for name, param in trainable.items():
        assert param.dtype == torch.float32 and param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_under_autocast_the_delta_node_and_the_mixed_kernel_leave_it_to_the_stock_modules(device):
    """Under the device's autocast the delta node (beside a hooked base) and the mixed-batch kernel step
    aside: autocast runs the stock modules in bf16, and each mixed row equals its adapter alone."""
    model = hooked_lora_net(0.3).to(device=device, dtype=torch.float32).train()
    x = torch.randn(4, 12, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and DELTA_NODE not in _graph_names(out)
    torch.manual_seed(0)
    mixed = peftlab.get_peft_model(tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                                   adapter_name="a")
    mixed.add_adapter("b", peftlab.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    mixed = mixed.to(device).eval()
    inputs = on(device, text_inputs(batch=4))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        rows = main_output(mixed(**inputs, adapter_names=["a", "b", "a", "__base__"]))
        mixed.set_adapter("b")
        alone = main_output(mixed(**{k: v[1:2] for k, v in inputs.items()}))
    # the same bf16 computation on one row or in the batch: equal up to bf16 rounding of a few layers' outputs
    torch.testing.assert_close(rows[1:2].float(), alone.float(), rtol=0.05, atol=0.05)

"""The fast LoRA paths (peftlab.kernels) against the readable path and hand-written references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab import kernels
from peftlab.layers import LayerWrapper
from tests.conftest import main_output, text_inputs, tiny_bert_cls, tiny_gpt2

FUSED_NODE = "LoraLinearFunctionBackward"


class Net(nn.Module):
    def __init__(self, in_features: int = 12, out_features: int = 10, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def lora_net(dropout: float = 0.0, dtype: torch.dtype = torch.float64, **kw) -> peftlab.PeftModel:
    torch.manual_seed(0)
    net = Net(bias=kw.pop("bias_layer", True)).to(dtype)
    config = peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], lora_dropout=dropout, init_lora_weights=False, **kw)
    return peftlab.get_peft_model(net, config)


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and gradients of a fixed loss wrt the input and every trainable parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weights).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def layer(model: peftlab.PeftModel, name: str = "lin") -> LayerWrapper:
    module = model.get_base_model().get_submodule(name)
    assert isinstance(module, LayerWrapper)
    return module


def assert_close_all(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_random_words_are_uniform_and_follow_torch_manual_seed():
    torch.manual_seed(3)
    words = kernels.random_words(50_000)
    assert words.dtype == torch.int64 and words.shape == (50_000,)
    torch.manual_seed(3)
    assert torch.equal(words, kernels.random_words(50_000))
    assert not torch.equal(words, kernels.random_words(50_000))  # the torch generator moved on
    # Every one of the 64 bits is a fair coin (std of each mean ~0.0022 over 50k words).
    bit_means = torch.stack([((words >> i) & 1).double().mean() for i in range(64)])
    assert (bit_means - 0.5).abs().max() < 0.015
    # Consecutive 16-bit fields (the mask's elements) are uncorrelated.
    fields = words.view(torch.int16).double()
    corr = torch.corrcoef(torch.stack([fields[:-1], fields[1:]]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_keep_mask_rate_and_reproducibility():
    torch.manual_seed(1)
    mask = kernels.keep_mask((400, 500), 0.1)
    assert mask.dtype == torch.uint8 and mask.shape == (400, 500)
    assert set(mask.unique().tolist()) == {0, 1}
    assert abs(mask.float().mean().item() - 0.9) < 0.005  # 200k draws: std ~0.0007
    torch.manual_seed(1)
    assert torch.equal(mask, kernels.keep_mask((400, 500), 0.1))
    # Columns and rows are independent draws, not a repeated pattern.
    assert not torch.equal(mask[0], mask[1])
    assert abs(kernels.keep_mask((1000, 100), 0.5).float().mean().item() - 0.5) < 0.01
    assert kernels.keep_mask((3, 7), 0.0).all()
    assert not kernels.keep_mask((3, 7), 1.0).any()


@pytest.mark.parametrize("p", [1 / 65536, 0.1, 0.5, 0.99])
def test_keep_mask_is_the_threshold_comparison_of_its_draws(p):
    """The clamp trick gives exactly ``int16 draw >= -32768 + round(p * 65536)``."""
    torch.manual_seed(7)
    mask = kernels.keep_mask((37, 11), p)
    torch.manual_seed(7)
    bits = kernels.random_words((37 * 11 + 3) // 4)
    expected = bits.view(torch.int16)[: 37 * 11] >= -32768 + round(p * 65536)
    assert torch.equal(mask.bool().view(-1), expected)


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (4, 5, 12)])
def test_fused_equals_plain_without_dropout(monkeypatch, bias, shape):
    model = lora_net(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64)
    out, grads = run(model, x)
    assert FUSED_NODE in _graph_names(model(x.requires_grad_(True)))
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    assert FUSED_NODE not in _graph_names(model(x))
    ref_out, ref_grads = run(model, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    assert_close_all(grads, ref_grads, rtol=0, atol=1e-12)
    if bias == "all":
        assert "base_model.model.lin.base_layer.bias" in grads


def abs_magnitudes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """For the output and every gradient of :func:`run`, each element's sum of |terms|: the same
    computation in fp64 on absolute values (every step is a product or a sum, so this is what
    fp32 rounding is proportional to)."""
    magnitudes = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in magnitudes.parameters():
            p.abs_()
    x = x.detach().double().abs().requires_grad_(True)
    out = magnitudes(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out).abs()).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in magnitudes.named_parameters() if p.requires_grad}}
    return {"out": out.detach(), **grads}


def test_fused_float32_matches_plain_within_fp32_rounding(monkeypatch):
    model = lora_net(dtype=torch.float32)
    x = torch.randn(4, 6, 12)
    assert FUSED_NODE in _graph_names(model(x.requires_grad_(True)))
    out, grads = run(model, x)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    assert FUSED_NODE not in _graph_names(model(x))
    ref_out, ref_grads = run(model, x)
    # The two paths sum in different orders (and ATen's AVX-512 / AVX2 / default kernels differ
    # again). The longest chain of sums behind any element: 4 * 6 rows (weight gradients),
    # 12 input features, rank 4. fp32 rounding of such a chain is at most n * eps * (sum of
    # |terms|) on each side.
    bound_factor = 2 * (4 * 6 + 12 + 4) * torch.finfo(torch.float32).eps
    magnitudes = abs_magnitudes(model, x)
    for key, value in {"out": out, **grads}.items():
        reference = {"out": ref_out, **ref_grads}[key]
        error = (value.double() - reference.double()).abs()
        bound = bound_factor * magnitudes[key]
        assert (error <= bound).all(), f"{key}: error {error.max():.3g} above the fp32 bound where it is exceeded"


@pytest.mark.parametrize("rows", [3, 20])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.25])  # none, drop positions, a keep mask
def test_fused_function_gradcheck(rows, fan_in_fan_out, dropout):
    """Every gradient of the fused node equals the finite-difference gradient of its formula."""
    torch.manual_seed(0)
    x = torch.randn(rows, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 7, dtype=torch.float64) if fan_in_fan_out else torch.randn(7, 12, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    drop = kernels.DropMask.draw((rows, 12), dropout, "cpu") if dropout else None
    keep = drop.keep() if dropout else None
    keep_scale = 1 / (1 - dropout)

    def fused(x, bias, lora_a, lora_b):
        return kernels.LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, drop, 0.5, fan_in_fan_out)

    assert torch.autograd.gradcheck(fused, (x, bias, lora_a, lora_b))
    w = weight.t() if fan_in_fan_out else weight
    x_in = x if keep is None else x * keep * keep_scale
    expected = x @ w.t() + bias + 0.5 * (x_in @ lora_a.t()) @ lora_b.t()
    torch.testing.assert_close(fused(x, bias, lora_a, lora_b), expected, rtol=0, atol=1e-12)


def _count_nodes(t: torch.Tensor, name: str) -> int:
    count, stack, seen = 0, [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += fn.name() == name
        stack.extend(f for f, _ in fn.next_functions)
    return count


def _graph_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def assert_equals_formula_with_same_mask(model: peftlab.PeftModel, p: float) -> None:
    """Output and gradients equal the textbook formula with the mask the fast path drew from the same seed."""
    model.train()
    wrapped = layer(model)
    adapter = wrapped.adapters["default"]
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.manual_seed(123)
    out, grads = run(model, x)

    torch.manual_seed(123)
    keep = kernels.DropMask.draw((15, 12), p, "cpu").keep().view(3, 5, 12)  # the mask the node drew
    xr = x.clone().requires_grad_(True)
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    ref = wrapped.base_layer(xr) + (xr * keep / (1 - p)) @ a.T @ b.T * adapter.scaling
    (ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["x"], xr.grad, rtol=0, atol=1e-12)
    prefix = "base_model.model.lin."
    torch.testing.assert_close(grads[prefix + "lora_A.default.weight"], a.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[prefix + "lora_B.default.weight"], b.grad, rtol=0, atol=1e-12)
    assert not torch.allclose(grads["x"], _no_dropout_grad(model, x))  # the mask really applied


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])  # drop positions (p <= 0.05) and a keep mask
def test_fused_dropout_equals_reference_with_same_mask(p):
    assert_equals_formula_with_same_mask(lora_net(dropout=p), p)


def _no_dropout_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    try:
        return run(model, x)[1]["x"]
    finally:
        model.train()


def test_dropout_differs_between_steps_and_is_off_in_eval(monkeypatch):
    model = lora_net(dropout=0.3)
    x = torch.randn(8, 12, dtype=torch.float64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    fast = model(x)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    torch.testing.assert_close(fast, model(x), rtol=0, atol=1e-12)


def test_fused_dropout_is_unbiased_like_nn_dropout():
    """Averaged over many masks the dropped adapter output matches the no-dropout output."""
    model = lora_net(dropout=0.2)
    x = torch.randn(2, 12, dtype=torch.float64)
    model.eval()
    expected = model(x)
    model.train()
    with torch.no_grad():
        mean = torch.stack([model(x) for _ in range(3000)]).mean(0)
    base = layer(model).base_layer(x)
    assert torch.allclose(mean - base, expected - base, atol=0.03 * (expected - base).abs().max().item())


def test_conv1d_fan_in_fan_out_matches_plain(monkeypatch):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(
        tiny_gpt2().double(), peftlab.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False, fan_in_fan_out=True)
    )
    inputs = text_inputs()
    model.train()
    model.get_base_model().config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0

    def step():
        out = main_output(model(**inputs))
        out.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = step()
    adapted = sum(isinstance(m, LayerWrapper) for m in model.modules())
    assert adapted == 4 * 2 and _count_nodes(main_output(model(**inputs)), FUSED_NODE) == adapted  # c_attn is 32 -> 96: not square
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    ref_out, ref_grads = step()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    assert_close_all(grads, ref_grads, rtol=0, atol=1e-10)


def test_merged_and_unmerged_agree_and_merged_skips_adapter():
    model = lora_net()
    x = torch.randn(4, 12, dtype=torch.float64)
    model.eval()
    unmerged = model(x)
    model.merge_adapter()
    merged = model(x.requires_grad_(True))
    assert FUSED_NODE not in _graph_names(merged)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12)


def test_dora_keeps_readable_path(monkeypatch):
    model = lora_net(use_dora=True)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert FUSED_NODE not in _graph_names(y)
    out, grads = run(model, x)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    ref_out, ref_grads = run(model, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert_close_all(grads, ref_grads, rtol=0, atol=0)


def _square_lora(base: nn.Linear) -> peftlab.PeftModel:
    net = Net().double()
    net.lin = base.double()  # square (12 -> 12): a transposed weight would still fit the shapes
    return peftlab.get_peft_model(net, peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))


def _reference(model: peftlab.PeftModel, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    adapter = layer(model).adapters["default"]
    return base_out + adapter.scaling * x @ adapter.lora_A.weight.T @ adapter.lora_B.weight.T


def test_subclassed_or_hooked_base_keeps_readable_path():
    """Each reason to keep the base's own forward, alone: a subclass (e.g. a quantized linear), a
    forward hook, a forward pre-hook, a forward set on the instance (as accelerate's hooks do)."""

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    model = _square_lora(MyLinear(12, 12))
    out = model(x)
    assert FUSED_NODE not in _graph_names(out)
    plain = layer(model).base_layer
    torch.testing.assert_close(out, _reference(model, 2 * nn.functional.linear(x, plain.weight, plain.bias), x))

    hooked = _square_lora(nn.Linear(12, 12))
    calls = []
    layer(hooked).base_layer.register_forward_hook(lambda *a: calls.append(1))
    assert FUSED_NODE not in _graph_names(hooked(x)) and calls

    pre_hooked = _square_lora(nn.Linear(12, 12))
    layer(pre_hooked).base_layer.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    out = pre_hooked(x)
    assert FUSED_NODE not in _graph_names(out)
    base = layer(pre_hooked).base_layer
    torch.testing.assert_close(out, _reference(pre_hooked, nn.functional.linear(3 * x, base.weight, base.bias), x))

    patched = _square_lora(nn.Linear(12, 12))
    base = layer(patched).base_layer
    original = base.forward
    base.forward = lambda inp: original(inp) + 1.0
    out = patched(x)
    assert FUSED_NODE not in _graph_names(out)
    torch.testing.assert_close(out, _reference(patched, nn.functional.linear(x, base.weight, base.bias) + 1.0, x))

    assert FUSED_NODE in _graph_names(_square_lora(nn.Linear(12, 12))(x))  # the same layer, untouched: fused


def test_trainable_base_weight_keeps_readable_path():
    model = lora_net()
    layer(model).base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 12, dtype=torch.float64)
    out, grads = run(model, x)
    assert "base_model.model.lin.base_layer.weight" in grads


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b", "__base__", "c", "b", "a"],  # mixed order: stacked adapters and a row selector
        ["a", "a", "b", "b", "__base__", "c"],  # grouped by adapter: one slice per run
    ],
)
def test_mixed_batch_fast_equals_plain(monkeypatch, names):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(
        tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", peftlab.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"], init_lora_weights=False))
    model.add_adapter("c", peftlab.LoraConfig(r=3, target_modules="all-linear", init_lora_weights=False, use_rslora=True))
    model.eval()
    inputs = text_inputs(batch=6)
    fast = main_output(model(**inputs, adapter_names=names))
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    plain = main_output(model(**inputs, adapter_names=names))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    # Each row equals running its adapter alone.
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = main_output(model(**row))
        else:
            model.set_adapter(name)
            expected = main_output(model(**row))
        torch.testing.assert_close(fast[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_mixed_batch_stacked_kernel_is_used(monkeypatch):
    calls = []
    real = kernels.mixed_lora_forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr("peftlab.layers.mixed_lora_forward", spy)
    model = lora_net()
    model.add_adapter("other", peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.eval()
    x = torch.randn(3, 12, dtype=torch.float64)
    out = model(x, adapter_names=["default", "other", "__base__"])
    assert calls == [True]
    with model.disable_adapter():
        torch.testing.assert_close(out[2], model(x)[2])


def test_row_runs():
    assert kernels.row_runs(["a", "a", "b", "a"]) == [("a", 0, 2), ("b", 2, 3), ("a", 3, 4)]
    assert kernels.row_runs(["x"]) == [("x", 0, 1)]


@pytest.mark.parametrize(
    ("rows", "stacked"),
    [
        (["a", "a", "b", "b", "b", "__base__"], False),  # grouped: per-run slices
        (["a", "b", "a", "b", "a", "b"], True),  # 6 runs of 2 adapters: stacked with a row selector
        (["a", "b", "a", "b"], False),  # 4 runs of 2 adapters: at the limit, still per-run slices
    ],
)
def test_mixed_lora_forward_matches_per_row_formula(monkeypatch, rows, stacked):
    selector_calls = []
    real_selector = kernels._row_selector
    monkeypatch.setattr(kernels, "_row_selector", lambda *a: selector_calls.append(1) or real_selector(*a))
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double().requires_grad_(False)
    factors = {
        "a": (torch.randn(4, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64), 0.5),
        "b": (torch.randn(2, 12, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64), 3.0),
    }
    x = torch.randn(len(rows), 5, 12, dtype=torch.float64)
    out = kernels.mixed_lora_forward(base, x, rows, factors)
    assert bool(selector_calls) == stacked
    for i, name in enumerate(rows):
        expected = base(x[i])
        if name in factors:
            a, b, s = factors[name]
            expected = expected + s * x[i] @ a.t() @ b.t()
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_under_bf16_autocast_matches_readable_path(monkeypatch, dropout):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(
        tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    )
    inputs = text_inputs(batch=3)

    def run_autocast():
        torch.manual_seed(5)  # the same dropout masks on both paths
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = main_output(model(**inputs))
        out.float().pow(2).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FUSED_NODE in _graph_names(main_output(model(**inputs)))
    out, grads = run_autocast()
    assert out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())  # adapter weights stay fp32
    if dropout == 0.0:  # masks differ between the paths (keep_mask vs nn.Dropout), so values only without dropout
        monkeypatch.setenv("PEFTLAB_PLAIN", "1")
        ref_out, ref_grads = run_autocast()
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.05, atol=0.05)
        for name in grads:
            scale = ref_grads[name].abs().max().item()
            assert (grads[name] - ref_grads[name]).abs().max().item() <= 0.05 * scale + 1e-3, name


def test_mixed_batch_under_autocast_takes_the_generic_path():
    torch.manual_seed(0)
    model = peftlab.get_peft_model(tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    inputs = text_inputs(batch=4)
    names = ["a", "b", "a", "__base__"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = main_output(model(**inputs, adapter_names=names))
        model.set_adapter("b")
        alone = main_output(model(**{k: v[1:2] for k, v in inputs.items()}))
    torch.testing.assert_close(mixed[1:2].float(), alone.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_node_keeps_no_input_sized_tensor_but_x(dropout):
    """With or without dropout, the only input-sized tensor the fused node keeps for backward is
    x itself (shared with whatever else holds it): no dropped copy of x, no per-element mask."""
    model = lora_net(dropout=dropout)
    model.train()
    x = torch.randn(6, 5, 12, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert FUSED_NODE in _graph_names(out)
    input_sized = [t for t in saved if t.numel() >= x.numel()]
    assert input_sized and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in input_sized)
    others = sum(t.numel() for t in saved if t.numel() < x.numel())
    # the frozen weight (10 x 12), A (4 x 12), B (10 x 4) and h (30 x 4)
    assert others == 10 * 12 + 4 * 12 + 10 * 4 + 30 * 4
    out.sum().backward()  # and backward, drawing the mask again, still works
    assert x.grad is not None


def count_mask_draws(monkeypatch) -> dict[str, int]:
    """Count the calls of the two dropout-mask kernels (drop positions, keep mask) from now on."""
    calls = {"positions": 0, "keep": 0}
    real = {"positions": kernels.drop_positions, "keep": kernels.keep_mask}

    def counted(kind: str):
        def draw(*args, **kwargs):
            calls[kind] += 1
            return real[kind](*args, **kwargs)

        return draw

    monkeypatch.setattr(kernels, "drop_positions", counted("positions"))
    monkeypatch.setattr(kernels, "keep_mask", counted("keep"))
    return calls


@pytest.mark.parametrize("hooked", [False, True])  # the fused node, and the delta node beside a hooked base
@pytest.mark.parametrize(("p", "keep_draws"), [(0.05, 0), (0.3, 2)])  # drop positions; a keep mask
def test_drop_positions_are_drawn_once_and_kept_for_backward(monkeypatch, hooked, p, keep_draws):
    """With drop positions the node keeps them (int32, ~p * numel of them) instead of drawing them again
    in backward; a keep mask (1 byte per element) is still drawn again from its seed."""
    model = hooked_lora_net(p) if hooked else lora_net(dropout=p)
    model.train()
    calls = count_mask_draws(monkeypatch)
    x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    out.sum().backward()
    kept = [t for t in saved if t.dtype in (torch.int32, torch.int64)]
    if keep_draws == 0:
        assert calls == {"positions": 1, "keep": 0}
        assert len(kept) == 1 and kept[0].dtype == torch.int32 and kept[0].numel() < 0.2 * x.numel()
    else:
        assert calls == {"positions": 0, "keep": keep_draws}
        assert not kept


def test_drop_mask_reads_kept_positions_back_as_drawn():
    drop = kernels.DropMask((300, 40), 0.05, torch.device("cpu"), 8)
    pattern = drop.pattern()
    kept = drop.to_keep(pattern)
    assert kept.dtype == torch.int32 and torch.equal(kept.long(), pattern)
    assert drop.pattern(kept).dtype == torch.int64 and torch.equal(drop.pattern(kept), pattern)
    dense = kernels.DropMask((300, 40), 0.3, torch.device("cpu"), 8)
    assert dense.to_keep(dense.pattern()) is None
    huge = kernels.DropMask((2**16, 2**15), 0.05, torch.device("cpu"), 8)  # 2**31 elements: int32 cannot index them
    positions = torch.tensor([0, 2**31 - 1])
    assert huge.to_keep(positions) is positions


def test_drop_mask_draws_the_same_mask_from_its_seed():
    torch.manual_seed(5)
    drop = kernels.DropMask.draw((40, 30), 0.25, "cpu")
    torch.manual_seed(5)
    direct = kernels.keep_mask((40, 30), 0.25)  # one torch draw seeds the mask either way
    assert torch.equal(drop.keep(), direct) and torch.equal(drop.keep(), drop.keep())
    assert drop.scale == pytest.approx(1 / 0.75)
    other = kernels.DropMask.draw((40, 30), 0.25, "cpu")
    assert other.seed != drop.seed and not torch.equal(other.keep(), drop.keep())


DELTA_NODE = "LoraDeltaFunctionBackward"


def hooked_lora_net(dropout: float) -> peftlab.PeftModel:
    """A LoRA net whose base layer has a forward hook: the fused node must not bypass it."""
    model = lora_net(dropout=dropout)
    layer(model).base_layer.register_forward_hook(lambda module, args, out: out)
    return model


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_delta_node_equals_reference_with_same_mask(p):
    model = hooked_lora_net(p)
    model.train()
    graph = _graph_names(model(torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)))
    assert DELTA_NODE in graph and FUSED_NODE not in graph  # the base ran itself (hook), the adapter term fused
    assert_equals_formula_with_same_mask(model, p)


@pytest.mark.parametrize("p", [0.05, 0.25])
def test_delta_node_gradcheck(p):
    torch.manual_seed(0)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    drop = kernels.DropMask.draw((9, 12), p, "cpu")
    assert not drop.keep().all()  # some elements really drop

    def delta(x, lora_a, lora_b):
        return kernels.LoraDeltaFunction.apply(x, lora_a, lora_b, drop, 0.5)

    assert torch.autograd.gradcheck(delta, (x, lora_a, lora_b))
    expected = 0.5 * ((x * drop.keep() / (1 - p)) @ lora_a.t()) @ lora_b.t()
    torch.testing.assert_close(delta(x, lora_a, lora_b), expected, rtol=0, atol=1e-12)


def test_delta_node_keeps_no_dropped_copy_and_is_skipped_without_dropout():
    model = hooked_lora_net(0.3)
    model.train()
    x = torch.randn(6, 5, 12, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert DELTA_NODE in _graph_names(out)
    input_sized = [t for t in saved if t.numel() >= x.numel()]
    assert input_sized and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in input_sized)
    model.eval()  # dropout off: the stock modules compute the term
    assert DELTA_NODE not in _graph_names(model(x))
    assert DELTA_NODE not in _graph_names(hooked_lora_net(0.0).train()(x))


def test_mask_seeds_span_the_int64_range_and_cpu_words_are_sfc64():
    """Seeds are full 63-bit draws (a float draw would give only 2^24 distinct masks), and the CPU
    words are numpy's SFC64 stream of that seed (the cheap generator the speed figures assume)."""
    import numpy as np

    seeds = [kernels.mask_seed() for _ in range(64)]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and max(seeds) > 2**40
    assert len(set(seeds)) == 64
    words = kernels.random_words(1000, "cpu", seed=seeds[0])
    assert torch.equal(words, torch.from_numpy(np.random.SFC64(seeds[0]).random_raw(1000).view(np.int64)))


def test_keep_mask_edge_probabilities():
    for p in (0.0, 1.0):
        mask = kernels.keep_mask((3, 7), p)
        assert mask.dtype == torch.uint8 and mask.shape == (3, 7)
        assert torch.equal(mask, torch.full((3, 7), int(p == 0.0), dtype=torch.uint8))
    torch.manual_seed(0)
    rare = kernels.keep_mask((1024, 1024), 1 / 65536)  # cut = 1: about 16 drops in 2^20
    assert 0 < int((rare == 0).sum()) < 64


def test_drop_positions_are_sorted_distinct_in_range_and_follow_the_seed():
    positions = kernels.drop_positions(200_000, 0.05, seed=11)
    assert positions.dtype == torch.int64
    assert (positions[1:] > positions[:-1]).all() and positions[0] >= 0 and positions[-1] < 200_000
    # 200k Bernoulli(0.05) trials: the count has std ~97; 5 std either way
    assert abs(positions.numel() - 10_000) < 500
    assert torch.equal(positions, kernels.drop_positions(200_000, 0.05, seed=11))
    assert not torch.equal(positions[:100], kernels.drop_positions(200_000, 0.05, seed=12)[:100])
    # The first and the last quarter drop at the same rate (no drift along the tensor).
    first, last = int((positions < 50_000).sum()), int((positions >= 150_000).sum())
    assert abs(first - 2500) < 250 and abs(last - 2500) < 250


def test_drop_positions_gaps_are_geometric():
    """Independent Bernoulli(p) trials: the number of kept elements before each drop is geometric,
    P(gap >= k) = (1 - p)^k, so neighbours drop together at rate p, not more, not less."""
    p = 0.1
    positions = kernels.drop_positions(1_000_000, p, seed=3)
    gaps = (positions[1:] - positions[:-1] - 1).double()
    for k in (0, 1, 5, 20):
        tail = (gaps >= k).double().mean().item()
        expected = (1 - p) ** k
        std = (expected * (1 - expected) / gaps.numel()) ** 0.5
        assert abs(tail - expected) < 5 * std + 1e-12, (k, tail, expected)
    assert abs(gaps.mean().item() - (1 - p) / p) < 5 * ((1 - p) ** 0.5 / p) / gaps.numel() ** 0.5


def test_drop_positions_do_not_depend_on_the_chunk_size():
    """Later chunks continue the same stream of gaps: a tiny chunk (many rounds) gives the same positions."""
    default = kernels.drop_positions(5_000, 0.05, seed=8)
    assert torch.equal(kernels.drop_positions(5_000, 0.05, seed=8, chunk=7), default)
    assert torch.equal(kernels.drop_positions(5_000, 0.05, seed=8, chunk=1), default)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_fused_dropout_takes_an_empty_batch(p):
    model = lora_net(dropout=p)
    model.train()
    x = torch.randn(0, 5, 12, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 5, 10) and FUSED_NODE in _graph_names(out)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert kernels.drop_positions(0, p, seed=1).shape == (0,)


def test_positions_kernel_warns_nothing_in_a_fresh_process():
    """torch warns once per process that CSR tensors are beta, and that invariant checks are off when
    not asked explicitly; neither may reach a user of the kernel (any warning is an error here)."""
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from peftlab import kernels\n"
        "warnings.simplefilter('error')\n"
        "x = torch.randn(64, 24, requires_grad=True)\n"
        "w, a, b = torch.randn(8, 24), torch.randn(4, 24, requires_grad=True), torch.randn(8, 4, requires_grad=True)\n"
        "for _ in range(3):\n"
        "    drop = kernels.DropMask.draw((64, 24), 0.05, 'cpu')\n"
        "    assert drop.sparse\n"
        "    kernels.LoraLinearFunction.apply(x, w, None, a, b, drop, 2.0, False).sum().backward()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_first_sparse_share_is_built_like_the_others(monkeypatch):
    """The first CSR matrix of a process (built with torch's warning silenced) is the same matrix,
    of the full shape even when the last columns hold no entry, and later builds skip the silencing."""
    monkeypatch.setattr(kernels, "_CSR_PRIMED", False)
    positions = torch.tensor([1, 5, 6, 13])  # (3, 5): rows 0, 1, 1, 2; column 4 stays empty
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = torch.zeros(15, dtype=torch.float64).index_put_((positions,), values).view(3, 5)
    first = kernels._csr_rows(positions, values, (3, 5))
    assert kernels._CSR_PRIMED is True
    assert first.shape == (3, 5) and torch.equal(first.to_dense(), expected)
    assert torch.equal(kernels._csr_rows(positions, values, (3, 5)).to_dense(), expected)


def test_drop_positions_draws_once_and_a_bounded_number_of_words(monkeypatch):
    """The default chunk is the expected count plus six standard deviations (+16): one draw of the
    generator covers the tensor, and the words drawn stay within that bound (no more than needed)."""
    import numpy as np

    real, draws = np.random.SFC64, []

    class Counting:
        def __init__(self, seed):
            self.inner = real(seed)

        def random_raw(self, count):
            draws.append(count)
            return self.inner.random_raw(count)

    monkeypatch.setattr(kernels.np.random, "SFC64", Counting)
    numel, p = 200_000, 0.05
    mean, std = numel * p, (numel * p * (1 - p)) ** 0.5
    for seed in range(10):
        draws.clear()
        kernels.drop_positions(numel, p, seed)
        assert len(draws) == 1 and mean + 5 * std <= draws[0] <= mean + 6 * std + 16


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_drop_positions_refuses_probabilities_without_a_geometric_gap(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        kernels.drop_positions(10, p, seed=0)


def test_drop_mask_draws_positions_up_to_p_one_twentieth_on_cpu():
    assert kernels.DropMask((4, 5), 0.05, torch.device("cpu"), 0).sparse
    assert kernels.DropMask((4, 5), 0.01, torch.device("cpu"), 0).sparse
    assert not kernels.DropMask((4, 5), 0.05 + 1e-9, torch.device("cpu"), 0).sparse
    assert not kernels.DropMask((4, 5), 0.1, torch.device("cpu"), 0).sparse
    assert not kernels.DropMask((4, 5), 0.0, torch.device("cpu"), 0).sparse
    assert not kernels.DropMask((4, 5), 0.05, torch.device("meta"), 0).sparse  # other devices: a keep mask
    drop = kernels.DropMask((300, 40), 0.05, torch.device("cpu"), 21)
    keep = drop.keep()
    assert keep.dtype == torch.uint8 and keep.shape == (300, 40)
    assert torch.equal(torch.nonzero(keep.view(-1) == 0).view(-1), drop.pattern())


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_drop_mask_operations_equal_the_keep_mask(p, dtype):
    """``dropped_into``, ``zero_dropped_`` and ``project`` (the sparse share subtracted, or the dropped
    copy for dtypes the sparse product lacks) equal the same arithmetic with the dense 0/1 mask."""
    torch.manual_seed(0)
    drop = kernels.DropMask.draw((64, 24), p, "cpu")
    keep = drop.keep().to(dtype)
    wide = torch.randn(64, 40).to(dtype)
    x = wide[:, 3:27]  # not contiguous: rows of 40 viewed as 24
    lora_a = torch.randn(5, 24).to(dtype)
    pattern = drop.pattern()
    out = torch.empty(64, 24, dtype=dtype)
    assert drop.dropped_into(x, pattern, out) is out and torch.equal(out, x * keep)
    t = torch.randn(64, 24).to(dtype)
    expected = t * keep
    assert torch.equal(drop.zero_dropped_(t, pattern), expected) and torch.equal(t, expected)
    reference = (x.double() * keep.double()) @ lora_a.double().t()
    magnitude = x.double().abs() @ lora_a.double().abs().t()
    # 24 products summed, and for the sparse share one subtraction of a sum of <= 24 more: 2 * (24 + 1) eps
    eps = torch.finfo(dtype).eps
    bound = 2 * (24 + 1) * eps * magnitude
    assert ((drop.project(x, lora_a, pattern).double() - reference).abs() <= bound).all()


def test_fused_takes_one_dimensional_inputs_and_leaves_bad_widths_to_the_base(monkeypatch):
    model = lora_net()
    x = torch.randn(12, dtype=torch.float64)
    out = model(x.clone().requires_grad_(True))
    assert out.shape == (10,) and FUSED_NODE in _graph_names(out)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)
    monkeypatch.delenv("PEFTLAB_PLAIN")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        model(torch.randn(4, 11, dtype=torch.float64))  # the base layer's own error, not a reshape error


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.3])
def test_fused_under_autocast_is_the_formula_in_bf16_with_bias_and_mask(dropout):
    """Under bf16 autocast the fused node computes ``x W^T + b + s B A drop(x)`` from bf16-rounded
    operands (bias included, dropout applied in training), within bf16 rounding of that formula."""
    model = lora_net(dropout=dropout, dtype=torch.float32)
    model.train()
    wrapped = layer(model)
    adapter = wrapped.adapters["default"]
    base = wrapped.base_layer
    assert base.bias.abs().min() > 0  # a dropped bias would show
    x = torch.randn(6, 12)
    torch.manual_seed(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.clone().requires_grad_(True))
    assert out.dtype == torch.bfloat16 and FUSED_NODE in _graph_names(out)
    torch.manual_seed(9)
    keep = kernels.DropMask.draw((6, 12), dropout, "cpu").keep().double() / (1 - dropout) if dropout else torch.ones(6, 12, dtype=torch.float64)
    low = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    a, b = low(adapter.lora_A.weight), low(adapter.lora_B.weight)
    ref = low(x) @ low(base.weight).T + low(base.bias) + adapter.scaling * ((low(x) * keep) @ a.T) @ b.T
    magnitude = low(x).abs() @ low(base.weight).abs().T + low(base.bias).abs() + adapter.scaling * ((low(x) * keep).abs() @ a.abs().T) @ b.abs().T
    # bf16 products of 12 + 4 terms plus the final rounding: (16 + 2) * eps(bf16) of the magnitudes
    bound = (16 + 2) * 2.0**-8 * magnitude
    assert ((out.double() - ref).abs() <= bound).all()
    if dropout:
        eval_like = low(x) @ low(base.weight).T + low(base.bias) + adapter.scaling * (low(x) @ a.T) @ b.T
        assert not ((out.double() - eval_like).abs() <= bound).all()  # the mask really applied


@pytest.mark.parametrize("ranks", [(128, 128), (128, 129)])
def test_mixed_lora_forward_stacks_up_to_256_ranks(ranks):
    base = nn.Linear(12, 10).double().requires_grad_(False)
    factors = {n: (torch.randn(r, 12, dtype=torch.float64), torch.randn(10, r, dtype=torch.float64), 1.0) for n, r in zip("ab", ranks)}
    x = torch.randn(6, 12, dtype=torch.float64)
    out = kernels.mixed_lora_forward(base, x, ["a", "b"] * 3, factors)  # 6 runs of 2 names: the stacked kernel
    assert (out is not None) == (sum(ranks) <= 256)


def test_mixed_lora_forward_declines_other_dtypes_and_keeps_bf16():
    base = nn.Linear(12, 10).double().requires_grad_(False)
    x = torch.randn(4, 12, dtype=torch.float64)
    rows = ["a", "b", "a", "b"]
    a64, b64 = torch.randn(2, 12, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    assert kernels.mixed_lora_forward(base, x, rows, {"a": (a64.float(), b64, 1.0), "b": (a64, b64, 1.0)}) is None
    assert kernels.mixed_lora_forward(base, x, rows, {"a": (a64, b64.float(), 1.0), "b": (a64, b64, 1.0)}) is None
    assert kernels.mixed_lora_forward(base, x, rows, {"a": (a64.float(), b64.float(), 1.0), "b": (a64.float(), b64.float(), 1.0)}) is None
    low = nn.Linear(12, 10).to(torch.bfloat16).requires_grad_(False)
    rows = ["a", "b", "a", "b", "a", "b"]  # stacked
    factors = {n: (a64.to(torch.bfloat16), b64.to(torch.bfloat16), 0.5) for n in "ab"}
    xb = torch.randn(6, 12, dtype=torch.bfloat16)
    out = kernels.mixed_lora_forward(low, xb, rows, factors)
    assert out is not None and out.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_delta_node_gradients_when_only_some_inputs_need_them(p):
    """x without grad (a first layer's input) and a frozen B: A still gets the formula's gradient,
    and the node returns None, not something else, for what is not needed."""
    torch.manual_seed(0)
    x = torch.randn(20, 12, dtype=torch.float64)
    lora_a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 4, dtype=torch.float64)
    drop = kernels.DropMask.draw((20, 12), p, "cpu")
    assert not drop.keep().all()
    out = kernels.LoraDeltaFunction.apply(x, lora_a, lora_b, drop, 0.5)
    out.sum().backward()
    a_ref = lora_a.detach().clone().requires_grad_(True)
    (0.5 * ((x * drop.keep() / (1 - p)) @ a_ref.t()) @ lora_b.t()).sum().backward()
    torch.testing.assert_close(lora_a.grad, a_ref.grad, rtol=0, atol=1e-12)


def test_delta_node_is_off_under_plain_and_takes_one_dimensional_inputs(monkeypatch):
    model = hooked_lora_net(0.3)
    model.train()
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert out.shape == (10,) and DELTA_NODE in _graph_names(out)
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    assert DELTA_NODE not in _graph_names(model(x))


def test_fused_under_autocast_without_a_bias():
    model = lora_net(dtype=torch.float32, bias_layer=False)
    x = torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.clone().requires_grad_(True))
    assert out.dtype == torch.bfloat16 and FUSED_NODE in _graph_names(out)
    wrapped = layer(model)
    adapter = wrapped.adapters["default"]
    low = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    ref = low(x) @ low(wrapped.base_layer.weight).T + adapter.scaling * (low(x) @ low(adapter.lora_A.weight).T) @ low(adapter.lora_B.weight).T
    magnitude = low(x).abs() @ low(wrapped.base_layer.weight).abs().T + adapter.scaling * (low(x).abs() @ low(adapter.lora_A.weight).abs().T) @ low(adapter.lora_B.weight).abs().T
    assert ((out.double() - ref).abs() <= (16 + 2) * 2.0**-8 * magnitude).all()

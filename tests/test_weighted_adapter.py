"""add_weighted_adapter (linear, cat, svd) gives peft's combined adapter on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import peft_at_least, text_inputs, tiny_gpt2, tiny_llama
import peftlab
from peftlab import AdapterStateError


def _pair(lib, base, second_r: int):
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                    init_lora_weights=False))
    model.add_adapter("b", lib.LoraConfig(r=second_r, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("kind,second_r", [("linear", 4), ("cat", 2), ("svd", 2)])
def test_weighted_adapter_matches_peft(kind, second_r):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_llama().eval()
    theirs = _pair(peft, base, second_r)
    ours = _pair(peftlab, base, second_r)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same adapter weights (peft's tree)
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=kind)
        model.set_adapter("mix")
        model.eval()
    inputs = text_inputs()
    with torch.no_grad():
        out_ours, out_theirs = ours(**inputs).logits, theirs(**inputs).logits
        with ours.disable_adapter():
            plain = ours(**inputs).logits
    assert not torch.allclose(out_ours, plain)  # the mix changes the model
    # float32; svd factors may differ in sign, but their product (what the layer applies) agrees.
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-5)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


def test_weighted_adapter_on_gpt2_conv1d_svd_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    models = []
    for lib in (peft, peftlab):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
        m.add_adapter("b", lib.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
        models.append(m)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    outs = []
    for m in models:
        m.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=3)
        m.set_adapter("mix")
        with torch.no_grad():
            outs.append(m.eval()(**text_inputs()).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_weighted_adapter_refusals():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="one rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(AdapterStateError, match="one rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="ties", density=0.5)
    for kind in ("ties", "dare_linear_svd", "magnitude_prune"):
        for density in (None, 1.5, -0.1, True):
            with pytest.raises(AdapterStateError, match="density in"):
                model.add_weighted_adapter(["default", "default"], [1, 1], "mix", combination_type=kind, density=density)
    with pytest.raises(AdapterStateError, match="majority_sign_method"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="ties_svd", density=0.5, majority_sign_method="most")
    with pytest.raises(AdapterStateError, match="svd_clamp"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="svd", svd_clamp=2.0)
    with pytest.raises(AdapterStateError, match="not supported"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="dare")
    assert "mix" not in model.peft_config


# ----- ties / dare / magnitude_prune, equal to peft's on the same weights and seed -------------------------
PRUNING_KINDS = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_KINDS = ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def _three(lib, base, build_kwargs):
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(init_lora_weights=False, **build_kwargs(4, 8)))
    model.add_adapter("b", lib.LoraConfig(init_lora_weights=False, **build_kwargs(4, 4)))
    model.add_adapter("c", lib.LoraConfig(init_lora_weights=False, **build_kwargs(4 if build_kwargs is not _mixed_ranks else 2, 2)))
    return model


def _llama_qv(r, alpha):
    return dict(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])


def _mixed_ranks(r, alpha):
    return dict(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])


def _gpt2(r, alpha):
    return dict(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)


def _weighted_pair(build, build_kwargs, **merge):
    """peft's and peftlab's model, the same three adapters, each given the same combination from the same seed."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = build().eval()
    theirs = _three(peft, base, build_kwargs)
    ours = _three(peftlab, base, build_kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for model in (theirs, ours):
        torch.manual_seed(11)  # DARE draws its masks here, after the new adapter's own init
        model.add_weighted_adapter(["default", "b", "c"], [0.9, -0.6, 1.3], "mix", **merge)
        model.set_adapter("mix")
    return theirs, ours


def _assert_same_mix(theirs, ours):
    """The same functions on the same tensors in the same order, SVDs from the same LAPACK call: equal to the bit."""
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    mixed = [k for k in theirs_sd if ".mix." in k]
    assert mixed and set(mixed) == {k for k in ours_sd if ".mix." in k}
    for key in mixed:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    inputs = text_inputs()
    with torch.no_grad():
        out_ours, out_theirs = ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits
        with ours.disable_adapter():
            plain = ours(**inputs).logits
    assert not torch.allclose(out_ours, plain)
    # equal factors; the forwards differ (peftlab's fused LoRA kernel): each output sums at most the
    # model's fan-ins (+ rank) along its longest path of matmuls, one fp32 rounding per term
    torch.testing.assert_close(out_ours, out_theirs, atol=_path_terms(ours) * EPS * float(out_theirs.abs().max()), rtol=0)


EPS = torch.finfo(torch.float32).eps


def _path_terms(model: torch.nn.Module) -> int:
    return sum(min(p.shape) for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n and "wpe" not in n)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("kind", PRUNING_KINDS)
def test_pruning_combinations_match_peft(kind, sign):
    theirs, ours = _weighted_pair(tiny_llama, _llama_qv, combination_type=kind, density=0.5, majority_sign_method=sign)
    _assert_same_mix(theirs, ours)


@pytest.mark.parametrize("kind", SVD_KINDS)
@pytest.mark.parametrize("build,kwargs", [(tiny_llama, _mixed_ranks), (tiny_gpt2, _gpt2)])
def test_svd_combinations_match_peft(kind, build, kwargs):
    theirs, ours = _weighted_pair(build, kwargs, combination_type=kind, density=0.4, svd_rank=3, majority_sign_method="frequency")
    _assert_same_mix(theirs, ours)


def test_svd_clamp_and_reduced_svd_match_peft():
    theirs, ours = _weighted_pair(tiny_llama, _llama_qv, combination_type="svd", svd_clamp=0.9, svd_full_matrices=False)
    _assert_same_mix(theirs, ours)


def test_svd_on_conv2d_matches_peft():
    """The conv kernel's ΔW is factored as a (out, in * kh * kw) matrix, as peft does (peftlab refused it before)."""
    peft = pytest.importorskip("peft")
    from conftest import ConvNet

    torch.manual_seed(0)
    base = ConvNet().eval()
    models = []
    for lib in (peft, peftlab):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
        m.add_adapter("b", lib.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
        models.append(m)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    outs = []
    for m in models:
        torch.manual_seed(11)
        m.add_weighted_adapter(["default", "b"], [1.0, -0.5], "mix", combination_type="dare_ties_svd", density=0.6)
        m.set_adapter("mix")
        with torch.no_grad():
            outs.append(m.eval()(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))))
    theirs_sd, ours_sd = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(ours_sd[k], v) for k, v in theirs_sd.items() if ".mix." in k)
    assert torch.equal(outs[1], outs[0])  # equal factors and the same readable conv path


def test_combination_keeps_no_rslora_scale():
    """Sources with rsLoRA: the combination's factors carry the scale, so it must not scale again (peft: use_rslora=False)."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = peftlab.get_peft_model(copy.deepcopy(base), peftlab.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                          target_modules=["q_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default"], [1.0], "same", combination_type="linear")
    assert model.peft_config["same"].use_rslora is False
    inputs = text_inputs()
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        model.set_adapter("same")
        got = model(**inputs).logits
    # one adapter, weight 1: B' A' = s B A up to the rounding of sqrt(s)^2 and of the two products
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)



@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "ties"])
def test_lora_bias_combines_like_peft(kind):
    """The combination's bias is sum_i w_i s_i b_i, whatever the factors' combination (peft's rule)."""
    pytest.importorskip("peft")
    peft = peft_at_least("0.22")
    if peft is None:
        pytest.skip("peft < 0.22 does not combine lora_bias in add_weighted_adapter; the oracle is peft >= 0.22")
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    models = []
    for lib in (peft, peftlab):
        kwargs = dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(lora_bias=True, **kwargs))
        m.add_adapter("b", lib.LoraConfig(**kwargs))
        models.append(m)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    for m in models:
        m.add_weighted_adapter(["default", "b"], [0.5, -1.5], "mix", combination_type=kind, density=0.5)
    theirs, ours = (m.state_dict() for m in models)
    bias_keys = [k for k in theirs if k.endswith("lora_B.mix.bias")]
    assert bias_keys and ours[bias_keys[0]].shape == theirs[bias_keys[0]].shape
    for key in bias_keys:
        assert torch.equal(ours[key], theirs[key]), key
    assert models[1].peft_config["mix"].lora_bias

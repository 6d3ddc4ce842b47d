"""LoRA initialisations that read the base weight (PiSSA, OLoRA, orthogonal): config checks, the
factors and residual equal to peft's on the same base and seed, saves both ways, the conversion to a
plain LoRA on save, and rollback of a failed add.

Tolerances are worst-case fp32 rounding bounds: a sum of n products carries at most n roundings
of eps (float32) relative to the sum of the magnitudes of its terms (Higham, "Accuracy and
Stability of Numerical Algorithms", 3.1). Through a network the terms add up along its longest
path of matrix products; ``_path_terms`` counts them for each tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import LoraConfig, PeftConfigError, TargetModuleError, get_peft_model
from conftest import ConvNet, main_output, peft_at_least, text_inputs, tiny_gpt2, tiny_llama

EPS = torch.finfo(torch.float32).eps
INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
LLAMA = dict(r=4, lora_alpha=8, target_modules="all-linear")
GPT2 = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
MODELS = {"llama": (tiny_llama, LLAMA), "gpt2": (tiny_gpt2, GPT2)}


def _path_terms(model: torch.nn.Module) -> int:
    """Products summed along the longest chain of matmuls: every Linear/Conv1D's fan-in (+ LoRA rank), per block."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding):
            total += min(weight.shape) + 8  # fan-in (tiny models: the smaller side) plus the LoRA path's r <= 8
    return total


def _bound(model: torch.nn.Module, reference: torch.Tensor) -> float:
    return _path_terms(model) * EPS * float(reference.abs().max())


def _run(model, inputs):
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def _pair(init: str, model: str, seed: int = 3):
    """(base, peft model, peftlab model) built from the same base with the same seed."""
    peft = pytest.importorskip("peft")
    if init == "olora" and model == "gpt2" and peft_at_least("0.22") is None:
        pytest.skip("peft < 0.22 builds OLoRA factors for GPT-2's Conv1D from the transposed weight (shapes swapped); the oracle is peft >= 0.22")
    build, kwargs = MODELS[model]
    torch.manual_seed(0)
    base = build().eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=init, **kwargs))
    torch.manual_seed(seed)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=init, **kwargs))
    return base, theirs, ours


def _perturb(model, seed: int = 7) -> None:
    """The same change to the adapter factors of either library (names sorted: the same draws per tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ----- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS + ["pissa_niter_0", "pissa_niter_16"])
def test_accepted_inits(init):
    assert LoraConfig(r=4, init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("init", ["loftq", "eva", "corda", "pissa_niter_", "pissa_niter_x", "PiSSA", "olora2", 1])
def test_unknown_inits_are_refused(init):
    with pytest.raises(PeftConfigError, match="init_lora_weights must be"):
        LoraConfig(init_lora_weights=init)


def test_orthogonal_needs_even_ranks():
    with pytest.raises(PeftConfigError, match="even ranks"):
        LoraConfig(r=3, init_lora_weights="orthogonal")
    with pytest.raises(PeftConfigError, match="even ranks"):
        LoraConfig(r=4, rank_pattern={"q": 5}, init_lora_weights="orthogonal")


def test_base_reading_inits_with_dora_are_refused():
    with pytest.raises(PeftConfigError, match="use_dora"):
        LoraConfig(init_lora_weights="pissa", use_dora=True)


def test_config_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    LoraConfig(r=4, init_lora_weights="pissa_niter_4").save_pretrained(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).init_lora_weights == "pissa_niter_4"
    peft.LoraConfig(r=4, init_lora_weights="olora").save_pretrained(tmp_path)
    assert peftlab.PeftConfig.from_pretrained(tmp_path).init_lora_weights == "olora"


# ----- equal to peft at init ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("init", INITS)
def test_init_equals_peft(init, model):
    """Factors, residual base weights and outputs agree with peft's for the same base and seed.

    Both run the same fp32 decomposition (LAPACK SVD/QR, or svd_lowrank with the same draws) on the
    same weight; the factors then take <= 3 elementwise roundings and the residual W - s B A a sum
    of r products, so each tensor is within (r + 3) eps of its terms' magnitude.
    """
    base, theirs, ours = _pair(init, model)
    r = MODELS[model][1]["r"]
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert set(theirs_sd) == set(ours_sd)
    for key, value in theirs_sd.items():
        bound = (r + 3) * EPS * value.abs().max() if value.is_floating_point() else 0
        assert (ours_sd[key] - value).abs().max() <= bound, key
    changed = [k for k in theirs_sd if k.endswith("base_layer.weight")]
    base_sd = base.state_dict()
    moved = [k for k in changed if not torch.equal(ours_sd[k], base_sd[k.replace("base_model.model.", "").replace(".base_layer", "")])]
    assert bool(moved) == (init != "orthogonal")  # PiSSA / OLoRA leave the residual in the base
    inputs = text_inputs()
    expected = _run(base, inputs)
    bound = _bound(base, expected)
    torch.testing.assert_close(_run(ours, inputs), _run(theirs, inputs), atol=bound, rtol=0)
    torch.testing.assert_close(_run(ours, inputs), expected, atol=bound, rtol=0)  # the model is unchanged at init


def test_pissa_factors_are_the_top_singular_directions():
    from peftlab.methods.lora.init import pissa_factors

    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    lora_a, lora_b = pissa_factors(weight, 2, 0.5, "pissa")
    u, s, vh = torch.linalg.svd(weight.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    product = 0.5 * lora_b.double() @ lora_a.double()
    assert (product - best).abs().max() <= 10 * EPS * s[0]
    torch.testing.assert_close(lora_b.T @ lora_b, lora_a @ lora_a.T)  # balanced: both carry sqrt(S / s)


def test_olora_factors_are_qr():
    from peftlab.methods.lora.init import olora_factors

    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    lora_a, lora_b = olora_factors(weight, 3)
    torch.testing.assert_close(lora_b.T @ lora_b, torch.eye(3), atol=10 * EPS, rtol=0)
    assert torch.equal(lora_a, torch.triu(lora_a))


def test_embedding_gets_default_init_and_conv2d_is_refused():
    with pytest.warns(UserWarning, match="default init"):
        model = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["emb", "lin"], init_lora_weights="pissa"))
    assert torch.count_nonzero(model.get_base_model().emb.adapters["default"].lora_embedding_A) == 0
    base = ConvNet()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(TargetModuleError, match="Conv2d"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["lin", "conv"], init_lora_weights="olora"))
    for key, value in base.state_dict().items():  # "lin" was built first, and left untouched
        assert torch.equal(value, before[key]), key


# ----- saves both ways ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_loads_both_ways(init, model, tmp_path):
    """A saved PiSSA/OLoRA adapter names its init; loading it on the original base redoes the
    (deterministic) decomposition and then sets the trained factors, in either library."""
    peft = pytest.importorskip("peft")
    base, theirs, ours = _pair(init, model)
    _perturb(theirs)
    _perturb(ours)
    inputs = text_inputs()
    expected = _run(theirs, inputs)
    bound = _bound(base, expected)
    assert not torch.allclose(expected, _run(base, inputs), atol=100 * bound)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    loaded_ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    loaded_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for model_ in (ours, loaded_ours, loaded_theirs):
        torch.testing.assert_close(_run(model_, inputs), expected, atol=bound, rtol=0)


# ----- conversion to a plain LoRA on save --------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_on_save_matches_peft(init, tmp_path):
    """Both libraries write the same plain LoRA (rank 2r, alpha 2 alpha); on the *original* base it
    computes what the trained PiSSA/OLoRA model computes."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base, theirs, ours = _pair(init, "llama")
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.save_pretrained(tmp_path / name / "initial")
        _perturb(model)
    inputs = text_inputs()
    trained = _run(ours, inputs)
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.save_pretrained(tmp_path / name / "lora", path_initial_model_for_weight_conversion=str(tmp_path / name / "initial"))
    theirs_file = load_file(tmp_path / "theirs" / "lora" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "lora" / "adapter_model.safetensors")
    assert set(ours_file) == set(theirs_file)
    r = LLAMA["r"]
    for key, value in theirs_file.items():  # concatenations of equal factors: the residual bound of test_init_equals_peft
        assert (ours_file[key] - value).abs().max() <= (r + 3) * EPS * value.abs().max(), key
    ours_config = peftlab.PeftConfig.from_pretrained(tmp_path / "ours" / "lora")
    assert (ours_config.r, ours_config.lora_alpha, ours_config.init_lora_weights) == (2 * r, 2 * LLAMA["lora_alpha"], True)
    assert peftlab.PeftConfig.from_pretrained(tmp_path / "ours" / "initial").init_lora_weights == init  # only read
    bound = _bound(base, trained)
    plain_ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "lora")
    plain_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "lora")
    for model in (plain_ours, plain_theirs):
        torch.testing.assert_close(_run(model, inputs), trained, atol=bound, rtol=0)


def test_conversion_keeps_heads_and_pads_embeddings(tmp_path):
    """Tensors peft leaves out of a converted file (a trained head, an embedding LoRA) are kept, so it loads."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    torch.manual_seed(1)
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights="pissa")
    with pytest.warns(UserWarning, match="default init"):
        model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "initial")
    _perturb(model)
    inputs = text_inputs()
    trained = _run(model, inputs)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    plain = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(_run(plain, inputs), trained, atol=_bound(base, trained), rtol=0)


def test_conversion_refuses_a_wrong_initial_folder_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora"))
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="olora"))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(peftlab.CheckpointError, match="initial factors"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_rslora_with_patterns(tmp_path):
    with pytest.warns(UserWarning, match="cannot be converted"):
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora", use_rslora=True, rank_pattern={"q_proj": 4})
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "initial")
    with pytest.raises(PeftConfigError, match="use_rslora"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


# ----- rollback --------------------------------------------------------------------------------------
def test_failed_load_gives_the_base_its_weights_back(tmp_path):
    """A PiSSA adapter whose file does not fit: the residual written at install is undone (to rounding)."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    saved = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    saved.save_pretrained(tmp_path)
    config = peftlab.PeftConfig.from_pretrained(tmp_path)
    config.target_modules = ["q_proj", "v_proj"]  # the file lacks v_proj's factors
    target = copy.deepcopy(base)
    with pytest.raises(peftlab.CheckpointError, match="missing"):
        peftlab.PeftModel.from_pretrained(target, tmp_path, config=config)
    for key, value in base.state_dict().items():
        # W_res + s B A in fp32: r products plus two roundings per element, against |W| + s |B||A| <= 2 |W|max
        torch.testing.assert_close(target.state_dict()[key], value, atol=(2 + 2) * 2 * EPS * float(value.abs().max()), rtol=0)
    assert not any("lora" in n for n, _ in target.named_modules())

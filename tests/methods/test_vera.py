"""VeRA: the contract table, the formula by hand, the shared projections (drawn as peft draws them,
saved or redrawn from the key), and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, TargetModuleError, VeraConfig, get_peft_model
from _contract import Case, contract_tests
from conftest import main_output, text_inputs, tiny_gpt2, tiny_llama


def _rows(**kwargs):
    def ours(identity: bool):
        return VeraConfig(init_weights=identity, **kwargs)

    def theirs():
        import peft

        return peft.VeraConfig(init_weights=False, **kwargs)

    return ours, theirs


LLAMA = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])  # three shapes: blocks of the shared matrices
GPT2 = dict(r=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, projection_prng_key=7)
CASES = {
    "llama-vera": Case(tiny_llama, text_inputs, *_rows(**LLAMA)),
    "gpt2-vera-conv1d": Case(tiny_gpt2, text_inputs, *_rows(**GPT2)),
    "llama-vera-no-saved-projection": Case(tiny_llama, text_inputs, *_rows(save_projection=False, **LLAMA)),
}
globals().update(contract_tests(CASES))


def _run(model, inputs):
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def test_forward_and_delta_by_hand():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["v_proj", "down_proj"], init_weights=False))
    layer = model.get_base_model().model.layers[0].self_attn.v_proj  # (16, 32): the top-left block of A (4, 48), B (32, 4)
    adapter = layer.adapters["default"]
    vera_a = model.base_model.vera_A.get("default")
    vera_b = model.base_model.vera_B.get("default")
    assert vera_a.shape == (4, 48) and vera_b.shape == (32, 4)  # the largest in (down_proj: 48) and out (32)
    x = torch.randn(2, 32)
    a, b = vera_a[:, :32], vera_b[:16]
    expected = layer.base_layer(x) + adapter.vera_lambda_b * ((adapter.vera_lambda_d * (x @ a.T)) @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        delta = (adapter.vera_lambda_b[:, None] * b) @ (adapter.vera_lambda_d[:, None] * a)
        torch.testing.assert_close(adapter.delta_weight(), delta)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.endswith(("vera_lambda_b.default", "vera_lambda_d.default")) for n in trainable)


def test_projections_are_seeded_kaiming_uniform():
    from peftlab.methods.vera import shared_projections

    vera_a, vera_b = shared_projections(8, 40, 30, key=5)
    again_a, again_b = shared_projections(8, 40, 30, key=5)
    assert torch.equal(vera_a, again_a) and torch.equal(vera_b, again_b)
    assert not torch.equal(shared_projections(8, 40, 30, key=6)[0], vera_a)
    assert vera_a.abs().max() <= math.sqrt(6 / 30) and vera_b.abs().max() <= math.sqrt(6 / 8)  # bound sqrt(6 / fan_in)


def test_projections_equal_peft_and_are_saved_as_peft_saves_them(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**LLAMA))
    ours = get_peft_model(copy.deepcopy(base), VeraConfig(**LLAMA))
    for key in ("vera_A", "vera_B"):
        assert torch.equal(ours.base_model.get_submodule(key).get("default"), getattr(theirs.base_model, key)["default"])
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs_file, ours_file = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("theirs", "ours"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    assert torch.equal(ours_file["base_model.vera_A"], theirs_file["base_model.vera_A"])
    import json

    assert "exclude_modules" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())  # peft's VeraConfig lacks it


def test_saved_projections_are_what_a_load_uses(tmp_path):
    """A file's projections win over the key's draw (a platform whose generator differs still loads right)."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(init_weights=False, **LLAMA))
    with torch.no_grad():
        model.base_model.vera_A.get("default").mul_(2.0)
    inputs = text_inputs()
    expected = _run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_run(loaded, inputs), expected, atol=0, rtol=0)


def test_two_adapters_keep_their_own_projections_and_delete_cleanly():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", VeraConfig(r=6, target_modules=["q_proj", "down_proj"], projection_prng_key=3))
    assert model.base_model.vera_A.get("other").shape == (6, 48)
    assert model.base_model.vera_A.get("default").shape == (4, 32)
    model.delete_adapter("other")
    assert "other" not in dict(model.base_model.vera_A.named_buffers())
    assert not any("other" in n for n in model.state_dict())


def test_refusals_leave_the_model_untouched():
    with pytest.raises(PeftConfigError, match="bias"):
        VeraConfig(bias="vera_only")
    with pytest.raises(PeftConfigError, match="r must be"):
        VeraConfig(r=0)
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(TargetModuleError, match="linear layers"):
        get_peft_model(base, VeraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert set(base.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

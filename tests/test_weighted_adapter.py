"""add_weighted_adapter (linear, cat, svd) gives peft's combined adapter on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import text_inputs, tiny_gpt2, tiny_llama
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
    with pytest.raises(AdapterStateError, match="ties"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="ties")
    assert "mix" not in model.peft_config

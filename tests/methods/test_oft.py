"""OFT: the contract table, the Cayley transform and its Neumann series by hand, the block rotation
against the merged weight W R^T, peft's divisor adjustment, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab import OFTConfig, PeftConfigError, TargetModuleError, get_peft_model
from peftlab.methods.oft import cayley, skew_symmetric
from peftlab.methods.oft.oft import adjusted_divisor
from _contract import Case, contract_tests
from conftest import text_inputs, tiny_gpt2, tiny_llama

EPS = torch.finfo(torch.float32).eps


def _rows(peft_parity: bool = True, **kwargs):
    def ours(identity: bool):
        return OFTConfig(init_weights=identity, **kwargs)

    def theirs():
        import peft

        return peft.OFTConfig(init_weights=False, **kwargs)

    return ours, theirs if peft_parity else None


BLOCKS = dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])
SHARED = dict(r=4, oft_block_size=0, block_share=True, target_modules=["q_proj", "down_proj"])
EXACT = dict(oft_block_size=16, use_cayley_neumann=False, target_modules=["q_proj", "o_proj"])
CASES = {
    "llama-oft-blocks": Case(tiny_llama, text_inputs, *_rows(**BLOCKS)),
    "llama-oft-r-block-share": Case(tiny_llama, text_inputs, *_rows(**SHARED)),
    "llama-oft-exact-cayley": Case(tiny_llama, text_inputs, *_rows(**EXACT)),
    # peft 0.22's OFT refuses Conv1D; peftlab rotates its input the same way (no parity row)
    "gpt2-oft-conv1d": Case(tiny_gpt2, text_inputs, *_rows(False, oft_block_size=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}
globals().update(contract_tests(CASES))


def test_skew_symmetric_fills_the_upper_triangle_row_by_row():
    q = skew_symmetric(torch.tensor([[1.0, 2.0, 3.0]]), 3)
    assert torch.equal(q[0], torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))


def test_exact_cayley_is_orthogonal_and_the_series_approximates_it():
    torch.manual_seed(0)
    q = skew_symmetric(torch.randn(3, 6) * 0.05, 4)
    exact = cayley(q, None)
    eye = torch.eye(4).expand(3, 4, 4)
    # R^T R sums 4 products of entries <= 1: a few roundings of eps
    torch.testing.assert_close(exact.transpose(-1, -2) @ exact, eye, atol=16 * EPS, rtol=0)
    series = cayley(q, 5)
    by_hand = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(series, by_hand, atol=16 * EPS, rtol=0)
    # The series is the truncated expansion of (I + Q)(I - Q)^-1 = I + 2 sum_k Q^k, the exact transform of -Q
    # (peft's two modes differ by this sign): the rest is Q^4 + 2 sum_{k>=5} Q^k, bounded by
    # f^4 + 2 f^5 / (1 - f) with f the blocks' largest Frobenius norm (which bounds every entry).
    f = float(torch.linalg.matrix_norm(q).max())
    assert f < 1
    assert float((series - cayley(-q, None)).abs().max()) <= f**4 + 2 * f**5 / (1 - f) + 16 * EPS


def test_forward_is_the_merged_weight_times_x():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=8, target_modules=["down_proj"], init_weights=False))
    layer = model.get_base_model().model.layers[0].mlp.down_proj  # in 48 = 6 blocks of 8
    adapter = layer.adapters["default"]
    x = torch.randn(3, 48)
    with torch.no_grad():
        rotation = adapter.block_matrix()
        assert rotation.shape == (48, 48)
        expected = x @ (layer.base_layer.weight @ rotation.T).T
        # both sum 48 products of 48 more: bound by 2 * 48 roundings of |W| |R| |x|
        bound = 96 * EPS * float((x.abs() @ (layer.base_layer.weight.abs() @ rotation.abs().T).T).max())
        torch.testing.assert_close(layer(x), expected, atol=bound, rtol=0)
    assert [tuple(p.shape) for p in model.parameters() if p.requires_grad] == [(6, 28), (6, 28)]  # 8 * 7 / 2 per block


@pytest.mark.parametrize("features,wanted", [(48, 8), (48, 7), (48, 10), (48, 100), (32, 5), (37, 4)])
def test_divisor_adjustment_matches_peft(features, wanted):
    peft_oft = pytest.importorskip("peft.tuners.oft.layer")
    assert adjusted_divisor(features, wanted) == peft_oft.OFTLayer.adjust_oft_parameters(None, features, wanted)


def test_refusals():
    with pytest.raises(PeftConfigError, match="exactly one"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(PeftConfigError, match="exactly one"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(PeftConfigError, match="coft"):
        OFTConfig(coft=True)
    with pytest.warns(UserWarning, match="no effect"):
        OFTConfig(module_dropout=0.1)
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(TargetModuleError, match="linear layers"):
        get_peft_model(base, OFTConfig(target_modules=["q_proj", "embed_tokens"]))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.warns(UserWarning, match="does not divide"):
        get_peft_model(tiny_llama(), OFTConfig(oft_block_size=7, target_modules=["q_proj"]))

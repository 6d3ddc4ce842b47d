"""peftlab.functional's pure math against hand-written formulas (mutation testing found these unchecked)."""

from __future__ import annotations

import pytest
import torch

from peftlab import functional as Fn


@pytest.mark.parametrize("like_shape", [(400, 6), (400, 3, 2, 2)])
def test_rank_dropout_mask_draws_rows_and_broadcasts(like_shape):
    like = torch.zeros(like_shape, dtype=torch.float64)
    torch.manual_seed(0)
    mask = Fn.rank_dropout_mask(400, 0.25, rescale=False, like=like)
    torch.manual_seed(0)
    expected = (torch.rand(400) > 0.25).double()  # one uniform draw per output row, kept above p
    assert mask.shape == (400,) + (1,) * (len(like_shape) - 1) and mask.dtype == torch.float64
    assert torch.equal(mask.flatten(), expected)
    # binomial(400, 0.75): standard deviation of the kept share is ~0.022
    assert abs(float(mask.mean()) - 0.75) < 5 * (0.75 * 0.25 / 400) ** 0.5
    assert (mask * torch.ones(like_shape, dtype=torch.float64)).shape == like_shape


def test_rank_dropout_mask_rescale_keeps_the_mean_at_one():
    like = torch.zeros(50, 4, dtype=torch.float64)
    torch.manual_seed(1)
    plain = Fn.rank_dropout_mask(50, 0.4, rescale=False, like=like)
    torch.manual_seed(1)
    scaled = Fn.rank_dropout_mask(50, 0.4, rescale=True, like=like)
    torch.testing.assert_close(scaled, plain / plain.mean(), rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled.mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-15, atol=0)


def test_rank_dropout_mask_that_drops_everything_stays_finite():
    mask = Fn.rank_dropout_mask(8, 1.0, rescale=True, like=torch.zeros(8, 3))
    assert torch.equal(mask, torch.zeros(8, 1))  # not 0 / 0


def test_svd_delta_is_a_sum_of_scaled_rank_one_terms():
    """AdaLoRA's ``P diag(lambda) Q * s / (ranknum + 1e-5)`` written as sum_k lambda_k B[:, k] A[k, :]."""
    g = torch.Generator().manual_seed(0)
    lora_a, lora_e, lora_b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 5), (3, 1), (4, 3)))
    expected = sum(lora_e[k, 0] * torch.outer(lora_b[:, k], lora_a[k]) for k in range(3)) * 2.0 / (3 + 1e-5)
    # float64, three terms: rounding ~1e-16; the 1e-5 guard moves the result by ~3e-6 relative, far above it
    torch.testing.assert_close(Fn.svd_delta(lora_a, lora_e, lora_b, 2.0, 3.0), expected, rtol=1e-13, atol=0)
    assert Fn.svd_delta(lora_a, lora_e * 0, lora_b, 2.0, 0.0).abs().max() == 0  # a fully pruned rank stays finite

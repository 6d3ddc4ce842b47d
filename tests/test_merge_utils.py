"""peftlab.merge_utils: hand-computed TIES / pruning results, DARE's mask and expectation, and equality
with peft's ``peft.utils.merge_utils`` on the same tensors and seed."""

from __future__ import annotations

import math

import pytest
import torch

from peftlab import merge_utils as mu


def test_ties_by_hand():
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-2.0, -4.0, 1.0, 1.0])
    # density 0.5 keeps 2 of 4 by magnitude: [3, 0, 0, 2] and [-2, -4, 0, 0]; summed votes [1, -4, 0, 2]
    # elect [+, -, +, +]; agreeing entries: 3 | -4 | none | 2 (weights 1 and 2: -4 * 2 = -8)
    out = mu.ties([t1, t2], torch.tensor([1.0, 2.0]), density=0.5)
    assert torch.equal(out, torch.tensor([3.0, -8.0, 0.0, 2.0]))


def test_majority_sign_total_and_frequency_differ():
    tensors = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    weights = torch.ones(3)
    with pytest.warns(UserWarning, match="nothing is pruned"):
        total = mu.ties(tensors, weights, density=1.0, majority_sign_method="total")  # sum 3 > 0: + wins
    with pytest.warns(UserWarning):
        frequency = mu.ties(tensors, weights, density=1.0, majority_sign_method="frequency")  # two minus signs
    assert torch.equal(total, torch.tensor([5.0]))
    assert torch.equal(frequency, torch.tensor([-1.0]))  # mean of the two agreeing entries


def test_magnitude_prune_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -5.0], [3.0, -0.2]])
    assert torch.equal(mu.prune(t, 0.5, "magnitude"), torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(mu.magnitude_prune([t, t], torch.tensor([1.0, -0.5]), 0.25), torch.tensor([[0.0, -2.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="density"):
        mu.prune(t, -0.1, "magnitude")


def test_dare_keeps_entries_rescaled_and_is_unbiased():
    torch.manual_seed(0)
    t = torch.randn(4000)
    density = 0.3
    out = mu.prune(t, density, "random", rescale=True)
    kept = out != 0
    assert torch.equal(out[kept], t[kept] / density)  # kept entries are t / density exactly
    # the kept fraction is Binomial(n, d) / n: within 6 standard deviations
    assert abs(kept.float().mean().item() - density) < 6 * math.sqrt(density * (1 - density) / t.numel())
    # E[dare_linear] = sum_i w_i t_i: the mean of N draws per entry has variance t^2 w^2 (1 - d) / (d N)
    draws = 2000
    weights = torch.tensor([0.7, -1.2])
    tensors = [torch.randn(50), torch.randn(50)]
    mean = sum(mu.dare_linear(tensors, weights, density) for _ in range(draws)) / draws
    expected = mu.task_arithmetic(tensors, weights)
    std = torch.sqrt(sum((w * x) ** 2 for w, x in zip(weights, tensors)) * (1 - density) / (density * draws))
    assert bool(((mean - expected).abs() <= 6 * std + 1e-6).all())


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_equal_to_peft_on_the_same_seed(name, sign):
    peft_mu = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    args = {"task_arithmetic": (), "magnitude_prune": (0.4,), "dare_linear": (0.4,)}.get(name, (0.4, sign))
    outs = []
    for module in (peft_mu, mu):
        torch.manual_seed(3)
        outs.append(getattr(module, name)(tensors, weights, *args))
    assert torch.equal(outs[1], outs[0])

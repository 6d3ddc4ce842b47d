"""Merging task tensors (one per adapter, same shape) into one, as ``add_weighted_adapter`` does.

The same functions, names and arguments as peft's ``peft.utils.merge_utils``, so code written against
it switches by import; pure tensor math (only torch), usable on any stack of updates.

* task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089): ``sum_i w_i T_i``;
* magnitude pruning: keep the ``density`` fraction of each tensor's entries largest in magnitude;
* TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): prune by magnitude, elect a sign per
  entry (the sign of the sum, ``"total"``, or of the count of signs, ``"frequency"``), then average
  the weighted entries that agree with it (disjoint merge);
* DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop entries at random, keeping each
  with probability ``density``, and rescale the kept ones by ``1 / density`` so the expectation is
  unchanged; then task arithmetic (``dare_linear``) or TIES' sign election (``dare_ties``).

The random mask is ``torch.bernoulli`` of a tensor filled with ``density``, drawn from the global
generator once per tensor in list order, as peft draws it: the same seed gives the same masks.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (n,) viewed as (n, 1, ..., 1) to broadcast over stacked task tensors (n, ...)."""
    return weights.view(*weights.shape, *([1] * (task_tensors.dim() - weights.dim())))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` entries of largest magnitude."""
    keep = int(density * tensor.numel())
    flat_mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    flat_mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * flat_mask.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density``; ``rescale`` divides the kept ones by ``density``."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False) -> torch.Tensor:
    """Prune ``tensor`` to a ``density`` fraction by ``method``; ``density >= 1`` keeps it whole (no draw)."""
    if density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}.")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"unknown pruning method {method!r}; use 'magnitude' or 'random'.")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """For stacked task tensors (n, ...): where each entry's sign agrees with the elected sign.

    The elected sign is that of the entries' sum (``"total"``) or of the sum of their signs
    (``"frequency"``); a tie elects +. Zero entries agree with nothing.
    """
    signs = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = signs.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}.")
    return signs == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the task axis of the entries the mask keeps (0 where none is kept)."""
    total = (task_tensors * majority_sign_mask).sum(dim=0)
    return total / majority_sign_mask.sum(dim=0).clamp(min=1.0)


def _weighted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return stacked * reshape_weight_task_tensors(stacked, weights)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``."""
    return _weighted(task_tensors, weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic of the tensors pruned by magnitude to ``density``."""
    return task_arithmetic([prune(t, density, "magnitude") for t in task_tensors], weights)


def _elect_and_merge(pruned: list[torch.Tensor], weights: torch.Tensor, majority_sign_method: SignMethod) -> torch.Tensor:
    mask = calculate_majority_sign_mask(torch.stack(pruned, dim=0), majority_sign_method)  # signs before weighting
    return disjoint_merge(_weighted(pruned, weights), mask)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES: magnitude pruning, sign election, disjoint mean of the weighted tensors."""
    return _elect_and_merge([prune(t, density, "magnitude") for t in task_tensors], weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random pruning with rescaling, then task arithmetic."""
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE's random pruning with rescaling, then TIES' sign election and disjoint mean."""
    return _elect_and_merge([prune(t, density, "random", rescale=True) for t in task_tensors], weights, majority_sign_method)

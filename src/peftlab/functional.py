"""Pure tensor math shared by forward, merge and checkpoint code (no formula written twice)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r (Hu et al. 2021), or alpha / sqrt(r) for rank-stabilized LoRA (Kalajdzievic 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Delta weight of a linear LoRA: scaling * B @ A, shape (out, in)."""
    return (lora_b @ lora_a) * scaling


def lora_conv2d_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Delta kernel of a Conv2d LoRA whose A is a (r, in, kh, kw) conv and B a 1x1 (out, r) conv."""
    if lora_a.shape[2:] == (1, 1):
        return (lora_b.flatten(1) @ lora_a.flatten(1)).reshape(lora_b.shape[0], lora_a.shape[1], 1, 1) * scaling
    # Composing two convolutions: convolve A's kernels (as input channels) with B.
    return F.conv2d(lora_a.transpose(0, 1), lora_b).transpose(0, 1) * scaling


def lora_embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Delta table of an Embedding LoRA: A is (r, num_embeddings), B is (dim, r); result (num, dim)."""
    return (lora_b @ lora_a).T * scaling


def transpose_if(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Conv1D (GPT-2) stores weights as (in, out); everything else as (out, in)."""
    return weight.T if fan_in_fan_out else weight


# ----- LyCORIS family (LoHa, LoKr) ---------------------------------------------------------------
def tucker_kernel(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv kernel from a Tucker core: core (r, r, kh, kw), out_factor (r, out), in_factor (r, in).

    Result (out, in, kh, kw): ``K[p, q] = sum_ij core[i, j] * out_factor[i, p] * in_factor[j, q]``.
    """
    return torch.einsum("ijkl,ip,jq->pqkl", core, out_factor, in_factor)


def hadamard_delta(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """LoHa's update ``(w1_a @ w1_b) * (w2_a @ w2_b) * scale``: a Hadamard product of two rank-r
    matrices, whose rank can reach r^2. w*_a (out, r), w*_b (r, in); result (out, in)."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def hadamard_conv_delta(
    t1: torch.Tensor, w1_a: torch.Tensor, w1_b: torch.Tensor,
    t2: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float,
) -> torch.Tensor:
    """LoHa on a conv kernel with Tucker factors (effective conv decomposition); (out, in, kh, kw)."""
    return tucker_kernel(t1, w1_a, w1_b) * tucker_kernel(t2, w2_a, w2_b) * scale


def kronecker_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr's update: ``kron(w1, w2) * scale``; w1 (a, c), w2 (b, d) or (b, d, kh, kw).

    For a conv kernel w1 gets two trailing unit axes, so the result is (a*b, c*d, kh, kw).
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * scale


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``m * n`` with ``m <= n`` and m as close to sqrt(dimension) as allowed.

    ``factor > 0`` that divides ``dimension`` is used as m directly (m, dimension // m); any other
    positive factor caps m. -1 means no cap. (Same split as LyCORIS / peft, so shapes agree.)
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    best = 1
    m = 1
    while m * m <= dimension:
        if dimension % m == 0 and m <= cap:
            best = m
        m += 1
    return best, dimension // best


def rank_dropout_mask(rows: int, p: float, rescale: bool, like: torch.Tensor) -> torch.Tensor:
    """Keep each output row of a delta weight with probability 1 - p (shape broadcasts over ``like``)."""
    keep = (torch.rand(rows, device=like.device) > p).to(like.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(torch.finfo(like.dtype).tiny)
    return keep.view(-1, *([1] * (like.dim() - 1)))


# ----- DoRA -----------------------------------------------------------------------------------------
def weight_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of an (out, in) weight; DoRA's ``||W + dW||_c``, shape (out,)."""
    return torch.linalg.norm(weight, dim=1)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA folded into one (out, in) weight: ``m * (W + dW) / ||W + dW||``; also returns the norm used."""
    combined = weight + delta
    norm = weight_row_norm(combined)
    return combined * (magnitude / norm).unsqueeze(1), norm


# ----- AdaLoRA -------------------------------------------------------------------------------------
def svd_delta(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor, scaling: float, ranknum: torch.Tensor | float) -> torch.Tensor:
    """AdaLoRA's update ``P diag(lambda) Q * scaling / ranknum`` = B (A * E) * s / (ranknum + 1e-5).

    A (r, in), E (r, 1), B (out, r); result (out, in). The 1e-5 keeps a pruned-to-zero rank finite.
    """
    return lora_b @ (lora_a * lora_e) * scaling / (ranknum + 1e-5)

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

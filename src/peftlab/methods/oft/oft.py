"""OFT: orthogonal fine-tuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280; peft's block-diagonal
form, Liu et al. 2024, https://arxiv.org/abs/2311.06243).

A frozen linear ``h = W x`` becomes ``h = W R^T x``: ``R`` is block diagonal, ``r`` orthogonal blocks of
size ``b = in / r``, so it rotates the input in ``r`` independent groups of ``b`` features (and the
merged weight is ``W R^T``, whose rows keep their norms and angles). Each block is the Cayley transform
of a skew-symmetric matrix ``Q`` built from ``b (b - 1) / 2`` trained numbers:
``R = (I - Q)(I + Q)^{-1}``, or, by default (``use_cayley_neumann``), its truncated Neumann series
``I + 2Q + 2Q^2 + ... + Q^{n-1}`` (no inverse; the terms and their order are peft's, so the same
numbers give peft's R). ``Q = 0`` at init, so ``R = I`` and the model is unchanged.

Shapes: weight (r, b (b - 1) / 2) -> Q (r, b, b) -> R (r, b, b); x (..., in) -> (..., r, b) -> x_k R_k.
With ``block_share`` one block is shared by all groups (weight (1, ...)).

Not here: constrained OFT (``coft=True``: peft projects the parameter in place inside forward),
Conv2d and Embedding layers; ``module_dropout`` is accepted and, as in peft 0.22, has no effect.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import base_layer as BL
from peftlab.config import LayerConfig, PeftType
from peftlab.errors import PeftConfigError, TargetModuleError, caller_stacklevel
from peftlab.layers import AdapterView
from peftlab.methods.lora import LORA_DEFAULT_TARGETS
from peftlab.registry import MethodSpec, register


@dataclass
class OFTConfig(LayerConfig):
    """OFT settings (names and defaults as peft's ``OFTConfig``).

    Args:
        r: number of blocks per layer; or leave 0 and set ``oft_block_size`` (exactly one is non-zero).
        oft_block_size: features per block (default 32); a size that does not divide a layer's input
            is moved to the nearest divisor, with a warning, as peft does.
        module_dropout: accepted for peft's configs; has no effect (nor in peft 0.22).
        fan_in_fan_out: the base stores weights as (in, out) (GPT-2 Conv1D).
        bias: "none" only here.
        init_weights: True starts at R = I (the model is unchanged); False draws the parameters from N(0, 0.1^2).
        coft, eps: constrained OFT; only coft=False is implemented.
        block_share: one rotation block shared by all of a layer's groups.
        use_cayley_neumann: the Neumann series instead of the exact inverse (faster; approximately orthogonal).
        num_cayley_neumann_terms: terms of that series.
    """

    peft_type = PeftType.OFT

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PeftConfigError(f"OFTConfig: {name} must be a non-negative integer, got {value!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise PeftConfigError(f"OFTConfig: set exactly one of r (blocks per layer) and oft_block_size (features per "
                                  f"block), the other 0; got r={self.r}, oft_block_size={self.oft_block_size}.")
        if self.coft:
            raise PeftConfigError("OFTConfig: coft=True (constrained OFT) is not implemented in peftlab; use coft=False.")
        if self.bias != "none":
            raise PeftConfigError(f"OFTConfig: bias={self.bias!r} is not implemented in peftlab; use bias='none'.")
        if isinstance(self.module_dropout, bool) or not isinstance(self.module_dropout, (int, float)) or not 0 <= self.module_dropout < 1:
            raise PeftConfigError(f"OFTConfig: module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        if self.module_dropout > 0:
            warnings.warn("OFTConfig: module_dropout has no effect (as in peft 0.22, whose forward does not apply it).",
                          stacklevel=caller_stacklevel())
        for name in ("fan_in_fan_out", "init_weights", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise PeftConfigError(f"OFTConfig: {name} must be True or False, got {getattr(self, name)!r}.")


# ----- the math ----------------------------------------------------------------------------------
def skew_symmetric(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b (b - 1) / 2) -> (n, b, b): the entries fill each upper triangle row by row, minus the transpose."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def cayley(q_skew: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The Cayley transform ``(I - Q)(I + Q)^{-1}`` of a batch of skew matrices (n, b, b) (orthogonal),
    or, with ``neumann_terms``, its series ``I + 2Q + 2Q^2 + ... + 2Q^{n-2} + Q^{n-1}`` summed in peft's order."""
    n, b, _ = q_skew.shape
    eye = torch.eye(b, device=q_skew.device, dtype=q_skew.dtype)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q_skew, eye - q_skew, left=False)
    rotation = eye.repeat(n, 1, 1)
    if neumann_terms > 1:
        rotation.add_(q_skew, alpha=2.0)
    if neumann_terms > 2:
        power = torch.bmm(q_skew, q_skew)
        rotation.add_(power, alpha=2.0)
        for _ in range(3, neumann_terms - 1):
            power = torch.bmm(power, q_skew)
            rotation.add_(power, alpha=2.0)
        rotation.add_(torch.bmm(power, q_skew))  # the last term carries weight 1
    return rotation


def adjusted_divisor(features: int, wanted: int) -> int:
    """The divisor of ``features`` nearest to ``wanted`` (the smaller one on a tie), as peft adjusts r / block size."""
    if wanted >= features:
        return features
    higher = wanted
    while higher <= features and features % higher != 0:
        higher += 1
    lower = wanted
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


class Rotation(nn.Module):
    """The trained numbers of a layer's rotation blocks (``oft_R.<adapter>.weight`` in peft's files)."""

    def __init__(self, blocks: int, block_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(blocks, block_size * (block_size - 1) // 2))


class OftLinear(AdapterView):
    """OFT on a Linear / Conv1D: the input is rotated block by block before the base layer (``W R^T x``)."""

    transforms_input = True

    def __init__(self, in_features: int, r: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.oft_R = Rotation(1 if config.block_share else r, block_size)
        self.blocks, self.block_size = r, block_size
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        if config.init_weights:
            nn.init.zeros_(self.oft_R.weight)
        else:
            nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks, (r, b, b) (one repeated r times with block_share)."""
        weight = self.oft_R.weight
        blocks = cayley(skew_symmetric(weight, self.block_size), self.neumann_terms)
        return blocks.expand(self.blocks, -1, -1) if blocks.shape[0] == 1 else blocks

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.oft_R.weight
        grouped = x.to(weight.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", grouped, self.rotations())
        return rotated.reshape(x.shape).to(x.dtype)

    def block_matrix(self) -> torch.Tensor:
        """R as one (in, in) block-diagonal matrix."""
        return torch.block_diag(*self.rotations())

    def merge_into(self, base_layer: nn.Module) -> None:
        weight = BL.dense_weight(base_layer)
        BL.write_weight(base_layer, weight @ self.block_matrix().to(weight.dtype).T)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        # R is only approximately orthogonal with the Neumann series: undo with its true inverse, as peft.
        weight = BL.dense_weight(base_layer)
        inverse = torch.linalg.inv(self.block_matrix().to(torch.float32))
        BL.write_weight(base_layer, weight @ inverse.to(weight.dtype).T)


def make_oft_adapter(base: nn.Module, config: OFTConfig, adapter_name: str, module_name: str) -> OftLinear:
    if not BL.is_linear(base):
        raise TargetModuleError(f"OFT in peftlab adapts linear layers (nn.Linear, Conv1D); {module_name} is a "
                                f"{type(base).__name__} (peft's Conv2d / Embedding OFT is not implemented here).")
    in_features, _ = BL.features(base)
    wanted = config.r or config.oft_block_size
    size = adjusted_divisor(in_features, wanted)
    if size != wanted:
        warnings.warn(f"OFT: {'r' if config.r else 'oft_block_size'}={wanted} does not divide {module_name}'s {in_features} "
                      f"inputs; using {size}.", stacklevel=caller_stacklevel())
    r, block_size = (size, in_features // size) if config.r else (in_features // size, size)
    return OftLinear(in_features, r, block_size, config)


register(MethodSpec(OFTConfig, make_oft_adapter, LORA_DEFAULT_TARGETS, learning_rates=(1e-4, 3e-4, 1e-3)))

"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

Chosen with ``LoraConfig(use_dora=True)``. The adapted weight is split into a per-row magnitude
and a direction, and LoRA only moves the direction:

    W' = m * (W + s B A) / ||W + s B A||_row        m: (out,), trained; starts at ||W + s B A||_row

The norm is treated as a constant in backward (detached), as the paper recommends to save
memory. Forward never builds W' for the input: with ``base = W x`` (the base output minus its
bias) and ``k = m / norm``, the output is ``base + b + (k - 1) base + k s B A x``, so the
only extra work over LoRA is the norm of one (out, in) matrix per step. W' is a plain matrix,
so DoRA merges; unmerging divides by the factor ``k`` recorded at merge time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import functional as Fn
from peftlab.errors import AdapterStateError, TargetModuleError
from peftlab.methods.lora.layers import LoraLinear

if TYPE_CHECKING:
    from peftlab.methods.lora.lora import LoraConfig


class Magnitude(nn.Module):
    """DoRA's per-row magnitude ``m`` (out,) as a module with one ``weight``, so the layer holds it
    as ``lora_magnitude_vector.<adapter>.weight`` (peft's name; files store ``lora_magnitude_vector``)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features))


class DoraLinear(LoraLinear):
    """DoRA for ``nn.Linear`` and GPT-2 ``Conv1D``; adds ``lora_magnitude_vector`` (out,) to LoRA's A, B.

    The adapter reads the frozen base weight in forward, so it keeps a plain (unregistered)
    reference to its base layer: the weight is neither saved nor trained through it.
    """

    disk_keys = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}
    plain_low_rank = False  # the magnitude rescales the whole output

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, fan_in_fan_out: bool) -> None:
        in_features, out_features = BL.features(base)
        super().__init__(in_features, out_features, r, scaling, dropout, fan_in_fan_out)
        self.lora_magnitude_vector = Magnitude(out_features)
        object.__setattr__(self, "_base_layer", base)  # not a submodule: see class docstring
        self._merged_factor: torch.Tensor | None = None

    def _base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as (out, in)."""
        return BL.dense_weight(self._base_layer).to(dtype)

    def _lora_weight(self) -> torch.Tensor:
        return Fn.lora_linear_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)  # (out, in)

    def init_magnitude(self) -> None:
        """m = ||W + s B A||_row, so the adapter starts as plain LoRA with the same A, B."""
        with torch.no_grad():
            weight = self._base_weight(self.lora_A.weight.dtype)
            self.lora_magnitude_vector.weight.copy_(Fn.weight_row_norm(weight + self._lora_weight()))

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        weight = self._base_weight(x.dtype)
        norm = Fn.weight_row_norm(weight + self._lora_weight().detach()).detach()
        factor = self.lora_magnitude_vector.weight / norm  # (out,)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # The dropped input must go through both terms, so recompute W x on it.
            x = self.lora_dropout(x)
            base_out = F.linear(x, weight)
        else:
            bias = getattr(self._base_layer, "bias", None)
            base_out = (out - bias if bias is not None else out).to(x.dtype)
        lora_out = self.lora_B(self.lora_A(x)) * self.scaling
        return out + ((factor - 1) * base_out + factor * lora_out).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        raise AdapterStateError("DoRA's update is not additive; merge it with merge_adapter().")

    def merge_into(self, base_layer: nn.Module) -> None:
        with torch.no_grad():
            weight = BL.dense_weight(base_layer).to(self.lora_A.weight.dtype)
            merged, norm = Fn.dora_merged_weight(weight, self._lora_weight(), self.lora_magnitude_vector.weight)
            self._merged_factor = self.lora_magnitude_vector.weight / norm
            BL.write_weight(base_layer, merged)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        if self._merged_factor is None:
            raise AdapterStateError("this DoRA adapter was not merged by this process; nothing to unmerge.")
        with torch.no_grad():
            merged = BL.dense_weight(base_layer).to(self.lora_A.weight.dtype)
            BL.write_weight(base_layer, merged / self._merged_factor.unsqueeze(1) - self._lora_weight())
        self._merged_factor = None


def make_dora_adapter(base: nn.Module, r: int, scaling: float, config: "LoraConfig", module_name: str) -> DoraLinear:
    """Build the DoRA adapter for one layer (called by the LoRA factory when use_dora is set)."""
    if not BL.is_linear(base):
        raise TargetModuleError(
            f"DoRA cannot adapt {module_name} ({type(base).__name__}); peftlab's DoRA adapts nn.Linear and Conv1D. "
            f"Exclude it (exclude_modules) or set use_dora=False."
        )
    adapter = DoraLinear(base, r, scaling, config.lora_dropout, fan_in_fan_out=BL.settle_fan_in_fan_out("DoRA", base, config))
    adapter.reset(config.init_lora_weights)
    adapter.init_magnitude()
    return adapter

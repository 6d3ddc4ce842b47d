"""LoRA's layer adapters: ``out + s * B A x`` on Linear / Conv1D, Embedding and Conv2d.

Kept apart from the config and factory (:mod:`peftlab.methods.lora.lora`) so DoRA
(:mod:`peftlab.methods.lora.dora`) can build on :class:`LoraLinear` while the LoRA factory builds DoRA
adapters, without the two modules importing each other.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import functional as Fn
from peftlab import kernels
from peftlab.errors import AdapterStateError, caller_stacklevel
from peftlab.layers import AdapterView

InitMode = Literal[True, False, "gaussian"]


# Set by the factory on every LoRA adapter; the layer shows them as peft's per-adapter dicts.
LORA_HYPERPARAMETERS = ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias")


class LoraLinear(AdapterView):
    """LoRA for ``nn.Linear`` and GPT-2 ``Conv1D``: ``out + s * B(A(dropout(x)))``.

    Shapes: x (..., in) -> A -> (..., r) -> B -> (..., out).
    """

    #: The output is exactly ``out + s * B A x``, so the fused kernel and mixed-batch stacking apply
    #: (subclasses that change the formula, like DoRA, set it False).
    plain_low_rank: ClassVar[bool] = True
    per_adapter = LORA_HYPERPARAMETERS

    def __init__(
        self, in_features: int, out_features: int, r: int, scaling: float, dropout: float, fan_in_fan_out: bool,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        # lora_bias (peft): B gets a bias, so the update is s * (B A x + b); the fused paths know no bias.
        self.lora_B = nn.Linear(r, out_features, bias=bias)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        if bias:
            self.plain_low_rank = False

    def reset(self, init: InitMode) -> None:
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def start_from(self, lora_a: torch.Tensor, lora_b: torch.Tensor, take_from_base: bool) -> None:
        """Start from the given factors (an init that reads the base, :mod:`peftlab.methods.lora.init`).

        With ``take_from_base`` the base weight gives ``s B A`` up when the adapter is installed
        (PiSSA, OLoRA), so the model's output is unchanged. A CPU copy of the factors stays with
        the adapter: a rolled-back add gives the base that part back.
        """
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
        if take_from_base:
            self.__dict__["_base_part"] = (lora_a.detach().to("cpu", torch.float32), lora_b.detach().to("cpu", torch.float32))
            self.__dict__["_base_part_taken"] = False

    def _move_base_part(self, base_layer: nn.Module, sign: float) -> None:
        lora_a, lora_b = self.__dict__["_base_part"]
        weight = BL.dense_weight(base_layer)
        part = (self.scaling * lora_b.to(weight.device)) @ lora_a.to(weight.device)
        BL.write_weight(base_layer, weight + sign * part)

    def on_installed(self, base_layer: nn.Module) -> None:
        if "_base_part" in self.__dict__ and not self.__dict__["_base_part_taken"]:
            with torch.no_grad():
                self._move_base_part(base_layer, -1.0)
            self.__dict__["_base_part_taken"] = True
        others = [a for a in self.__dict__["_layer"].adapters.values() if a is not self]
        if others and any(a.__dict__.get("_base_part_taken") for a in [self, *others]):
            warnings.warn(
                "LoRA: a PiSSA/OLoRA adapter moved part of this layer's base weight into itself, so the other adapters "
                "here see the residual weight; to use it beside others, save it as a plain LoRA "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that on the original model.",
                stacklevel=caller_stacklevel(),
            )

    def on_discarded(self, base_layer: nn.Module) -> None:
        if self.__dict__.get("_base_part_taken"):
            with torch.no_grad():
                self._move_base_part(base_layer, 1.0)
            self.__dict__["_base_part_taken"] = False

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        delta = None
        if self.plain_low_rank:  # with dropout, on bases the fused node cannot bypass (4-bit, hooks)
            delta = kernels.lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self._dropout_p(), self.training)
        if delta is None:
            delta = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return out + delta.to(out.dtype)

    def _dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def fused_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if not self.plain_low_rank:
            return None
        return kernels.lora_linear(
            base_layer, x, self.lora_A.weight, self.lora_B.weight, self.scaling, self._dropout_p(), self.training
        )

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if not self.plain_low_rank or (self.training and self._dropout_p() > 0):
            return None
        return self.lora_A.weight, self.lora_B.weight, self.scaling

    def delta_weight(self) -> torch.Tensor:
        delta = Fn.lora_linear_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)
        return Fn.transpose_if(delta, self.fan_in_fan_out)

    def check_merge(self, base_layer: nn.Module) -> None:
        _check_bias_merge(self.lora_B.bias, base_layer)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, Fn.lora_linear_delta(self.lora_A.weight, self.lora_B.weight, self.scaling))
        _add_bias(base_layer, self.lora_B.bias, self.scaling)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -Fn.lora_linear_delta(self.lora_A.weight, self.lora_B.weight, self.scaling))
        _add_bias(base_layer, self.lora_B.bias, -self.scaling)


def _check_bias_merge(lora_bias: torch.Tensor | None, base_layer: nn.Module) -> None:
    if lora_bias is not None and getattr(base_layer, "bias", None) is None:
        raise AdapterStateError(
            f"this LoRA has a bias (lora_bias=True) but its {type(base_layer).__name__} has none to merge it into; "
            f"keep the adapter unmerged (nothing was merged)."
        )


def _add_bias(base_layer: nn.Module, lora_bias: torch.Tensor | None, scale: float) -> None:
    """The bias term of lora_bias=True merged: ``b_base += scale * b``."""
    if lora_bias is not None:
        base_layer.bias.data += (lora_bias.detach() * scale).to(base_layer.bias.dtype)


class LoraEmbedding(AdapterView):
    """LoRA for ``nn.Embedding``: ``out + s * embed(ids, A^T) @ B^T``; A (r, num), B (dim, r).

    Here A starts at zero and B random (the lookup table is A, so zeroing it gives identity).
    """

    per_adapter = LORA_HYPERPARAMETERS

    def __init__(self, base: nn.Embedding, r: int, scaling: float) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.zeros(base.embedding_dim, r))
        self.scaling = scaling
        self._lookup = dict(
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def reset(self, init: InitMode) -> None:
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(x, self.lora_embedding_A.T, **self._lookup)  # (..., r)
        return out + (rows @ self.lora_embedding_B.T * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return Fn.lora_embedding_delta(self.lora_embedding_A, self.lora_embedding_B, self.scaling)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, self.delta_weight())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -self.delta_weight())


class LoraConv2d(AdapterView):
    """LoRA for ``nn.Conv2d``: A is a conv with the base's kernel into r channels, B a 1x1 conv."""

    per_adapter = LORA_HYPERPARAMETERS

    def __init__(self, base: nn.Conv2d, r: int, scaling: float, dropout: float, bias: bool = False) -> None:
        super().__init__()
        self.lora_A = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation, bias=False
        )
        self.lora_B = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), bias=bias)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def reset(self, init: InitMode) -> None:
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_channels)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return Fn.lora_conv2d_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def check_merge(self, base_layer: nn.Module) -> None:
        _check_bias_merge(self.lora_B.bias, base_layer)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, self.delta_weight())
        _add_bias(base_layer, self.lora_B.bias, self.scaling)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -self.delta_weight())
        _add_bias(base_layer, self.lora_B.bias, -self.scaling)

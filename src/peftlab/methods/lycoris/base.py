"""What LoHa and LoKr share (the LyCORIS family, https://arxiv.org/abs/2309.14859).

Both build a full-size delta weight ``dW`` from a few small factors and add ``x -> dW x`` (or a
convolution with ``dW``) to the frozen layer's output. They differ only in how ``dW`` is
built, so each method's adapter implements :meth:`LycorisAdapter.delta_weight` and this base
does the forward pass, the two kinds of dropout, and merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import functional as Fn
from peftlab import limits
from peftlab.config import LayerConfig
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.layers import AdapterView
from peftlab.targeting import pattern_value


@dataclass
class LycorisConfig(LayerConfig):
    """Fields LoHa and LoKr share (names and defaults as in peft).

    Args:
        r: rank of each low-rank factor.
        alpha: the update is scaled by alpha / r.
        rank_dropout: in training, drop each output row of the delta weight with this probability.
        module_dropout: in training, skip the whole adapter for a forward pass with this probability.
        use_effective_conv2d: for k x k convolutions (k > 1), factor the kernel Tucker-style
            (a small r x r x k x k core) instead of flattening it to (out, in * k * k).
        rank_pattern / alpha_pattern: per-module overrides of r / alpha, keyed by a regex matched
            against the end of the module name.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PeftConfigError(f"{name}: r must be a positive integer, got {self.r!r}; try r=8.")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise PeftConfigError(f"{name}: alpha must be a finite number, got {self.alpha!r}.")
        limits.check_scale(name, "alpha / r", float(self.alpha) / self.r)
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise PeftConfigError(f"{name}: {key} must be in [0, 1), got {value!r}.")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise PeftConfigError(f"{name}: rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")

    def rank_and_scaling(self, module_name: str) -> tuple[int, float]:
        """(r, alpha / r) for one module after rank_pattern / alpha_pattern."""
        r = int(pattern_value(self.rank_pattern, module_name, self.r))
        alpha = float(pattern_value(self.alpha_pattern, module_name, self.alpha))
        limits.check_scale(type(self).__name__, "alpha / r", alpha / r)
        return r, alpha / r


class LycorisAdapter(AdapterView):
    """Base for adapters whose update is a delta weight built from factors.

    ``out + layer_op(x, dW)`` where layer_op is ``F.linear`` for Linear and ``F.conv2d`` (with
    the base layer's stride, padding, dilation and groups) for Conv2d; dW has the base weight's
    shape, (out, in) or (out, in / groups, kh, kw).
    """

    per_adapter = ("scaling", "rank_dropout", "module_dropout")

    def __init__(self, base: nn.Module, scaling: float, rank_dropout: float, module_dropout: float, rescale_rank_dropout: bool) -> None:
        super().__init__()
        self.scaling = scaling
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rescale_rank_dropout = rescale_rank_dropout
        self.weight_shape = BL.weight_shape(base)  # (out, in), or the Conv2d kernel
        self.conv_args: dict | None = None
        if isinstance(base, nn.Conv2d):
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update, shaped like the base weight."""
        raise NotImplementedError

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and float(torch.rand(1)) <= self.module_dropout:
            return out
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = delta * Fn.rank_dropout_mask(delta.shape[0], self.rank_dropout, self.rescale_rank_dropout, delta)
        x = x.to(delta.dtype)
        update = F.conv2d(x, delta, **self.conv_args) if self.conv_args is not None else F.linear(x, delta)
        return out + update.to(out.dtype)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, self.delta_weight().detach())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -self.delta_weight().detach())


def check_lycoris_target(method: str, base: nn.Module, module_name: str) -> None:
    """LoHa and LoKr adapt nn.Linear and nn.Conv2d only (not GPT-2's Conv1D, not embeddings)."""
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise TargetModuleError(
            f"{method} cannot adapt {module_name} ({type(base).__name__}); it adapts nn.Linear and nn.Conv2d. "
            f"Remove it from target_modules (GPT-2's Conv1D layers need LoRA or IA3)."
        )

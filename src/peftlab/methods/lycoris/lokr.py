"""LoKr: low-rank Kronecker product (Yeh et al. 2023, LyCORIS, https://arxiv.org/abs/2309.14859).

With out = a * b and in = c * d (``factorization`` picks factors near the square root), the
update is ``dW = kron(w1, w2) * alpha / r`` with w1 (a, c) and w2 (b, d). Either factor is a
full matrix when that is small, or a rank-r product (``w1_a @ w1_b``, ``w2_a @ w2_b``) when r is
less than half of its larger side. For Conv2d, w2 carries the kernel: (b, d, kh, kw) in full,
(b, r) @ (r, d * kh * kw) flattened, or a Tucker core ``lokr_t2`` (r, r, kh, kw) with
``use_effective_conv2d``. w1 (or w1_a) starts at zero, so the wrapped model is the base model
at init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import functional as Fn
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError
from peftlab.layers import AdapterView
from peftlab.methods.lora import LORA_DEFAULT_TARGETS
from peftlab.methods.lycoris.base import LycorisAdapter, LycorisConfig, check_lycoris_target
from peftlab.registry import MethodSpec, register


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr settings (see :class:`~peftlab.methods.lycoris.base.LycorisConfig` for the shared ones).

    Args:
        decompose_both: also factor w1 into a rank-r product when r is small enough
            (by default only w2 is factored).
        decompose_factor: cap on the smaller factor of each dimension; -1 picks the split
            closest to the square root.
        rank_dropout_scale: rescale the rows kept by rank_dropout so the expected update is unchanged.
        init_weights: True zeroes w1 (identity at init); "lycoris" zeroes w2 instead (the
            LyCORIS library's choice); False draws every factor at random (for tests).
    """

    peft_type = PeftType.LOKR

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise PeftConfigError(f"LoKrConfig: init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or not (
            self.decompose_factor == -1 or self.decompose_factor > 0
        ):
            raise PeftConfigError(
                f"LoKrConfig: decompose_factor must be -1 (automatic) or a positive integer, got {self.decompose_factor!r}."
            )


class LoKrAdapter(LycorisAdapter):
    """LoKr on nn.Linear or nn.Conv2d; parameter names as in peft's checkpoints (lokr_w1, lokr_w2_a, ...)."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        config: LoKrConfig,
    ) -> None:
        super().__init__(base, scaling, config.rank_dropout, config.module_dropout, config.rank_dropout_scale)
        out_dim, in_dim = self.weight_shape[0], self.weight_shape[1]
        kernel = tuple(self.weight_shape[2:])
        a, b = Fn.factorization(out_dim, config.decompose_factor)
        c, d = Fn.factorization(in_dim, config.decompose_factor)
        # A factor is stored in full unless rank r is less than half its larger side.
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        self.tucker = bool(kernel) and config.use_effective_conv2d and kernel != (1, 1) and not full_w2
        if full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))

    def reset(self, init: bool | str) -> None:
        for param in self.parameters():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if init is True:
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
        elif init == "lycoris":
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = Fn.tucker_kernel(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return Fn.kronecker_delta(w1, w2, self.scaling).reshape(self.weight_shape)


def make_lokr_adapter(base: nn.Module, config: LoKrConfig, adapter_name: str, module_name: str) -> AdapterView:
    check_lycoris_target("LoKr", base, module_name)
    r, scaling = config.rank_and_scaling(module_name)
    adapter = LoKrAdapter(base, r, scaling, config)
    adapter.reset(config.init_weights)
    return adapter


register(MethodSpec(LoKrConfig, make_lokr_adapter, LORA_DEFAULT_TARGETS, learning_rates=(3e-4, 1e-3, 3e-3)))

"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara, https://arxiv.org/abs/2108.06098;
as packaged by LyCORIS, https://arxiv.org/abs/2309.14859).

The update is the element-wise product of two rank-r matrices,
``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``, whose rank can reach r^2 for the parameter
cost of two rank-r LoRAs. ``w2_b`` starts at zero, so the wrapped model equals the base model
at init. dW is a plain matrix (or kernel), so it merges into the base weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import functional as Fn
from peftlab import limits
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError
from peftlab.layers import AdapterView
from peftlab.methods.lora import LORA_DEFAULT_TARGETS
from peftlab.methods.lycoris.base import LycorisAdapter, LycorisConfig, check_lycoris_target
from peftlab.registry import MethodSpec, register


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa settings (see :class:`~peftlab.methods.lycoris.base.LycorisConfig` for the shared ones).

    Args:
        init_weights: True starts ``w2_b`` at zero (identity at init); False draws every factor
            at random (the model changes at init; for tests).
    """

    peft_type = PeftType.LOHA

    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise PeftConfigError(f"LoHaConfig: init_weights must be True or False, got {self.init_weights!r}.")


class LoHaAdapter(LycorisAdapter):
    """LoHa on nn.Linear or nn.Conv2d.

    Shapes: Linear (out, in): w*_a (out, r), w*_b (r, in). Conv2d flattened: w*_a (out, r),
    w*_b (r, in/groups * kh * kw). Conv2d with effective decomposition (k > 1): hada_t* (r, r, kh, kw),
    w*_a (r, out), w*_b (r, in/groups), kernel rebuilt by :func:`peftlab.functional.tucker_kernel`.
    """

    def __init__(
        self, base: nn.Module, r: int, scaling: float, rank_dropout: float, module_dropout: float, effective_conv2d: bool
    ) -> None:
        super().__init__(base, scaling, rank_dropout, module_dropout, rescale_rank_dropout=True)
        out_dim = self.weight_shape[0]
        kernel = self.weight_shape[2:]
        self.tucker = effective_conv2d and len(kernel) == 2 and tuple(kernel) != (1, 1)
        if self.tucker:
            in_dim = self.weight_shape[1]
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            a_shape, b_shape = (r, out_dim), (r, in_dim)
        else:
            in_dim = math.prod(self.weight_shape[1:])
            a_shape, b_shape = (out_dim, r), (r, in_dim)
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))

    def reset(self, identity: bool) -> None:
        for param in self.parameters():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if identity:
            nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        if self.tucker:
            return Fn.hadamard_conv_delta(
                self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b, self.scaling
            )
        delta = Fn.hadamard_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)
        return delta.reshape(self.weight_shape)


def make_loha_adapter(base: nn.Module, config: LoHaConfig, adapter_name: str, module_name: str) -> AdapterView:
    check_lycoris_target("LoHa", base, module_name)
    r, scaling = config.rank_and_scaling(module_name)
    limits.check_rank("LoHa", r, base, module_name)  # before any factor is allocated
    adapter = LoHaAdapter(base, r, scaling, config.rank_dropout, config.module_dropout, config.use_effective_conv2d)
    adapter.reset(identity=config.init_weights)
    return adapter


register(MethodSpec(LoHaConfig, make_loha_adapter, LORA_DEFAULT_TARGETS, learning_rates=(3e-4, 1e-3, 3e-3)))

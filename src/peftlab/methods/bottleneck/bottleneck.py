"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751;
Pfeiffer et al. 2021, AdapterFusion, https://arxiv.org/abs/2005.00247).

A small two-layer network sits on the output ``h`` of a sub-layer's output projection, inside
the residual branch (before the residual add and LayerNorm):

    h' = h + W_up f(W_down dropout(h) + b_down) + b_up

with ``W_down`` (m, d), ``W_up`` (d, m), ``m = d / reduction_factor`` (or ``bottleneck_size``)
and ``f`` relu / gelu / swish. ``W_up`` and ``b_up`` start at zero, so the wrapped model equals
the base model at init. Placement decides which projections get one:

* ``houlsby``: after the attention output projection and after the feed-forward output;
* ``pfeiffer``: after the feed-forward output only (half the parameters, about the same quality).

The adapter is non-linear in ``h``, so it cannot be folded into a weight: merging raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import limits
from peftlab.config import LayerConfig, PeftType
from peftlab.errors import AdapterStateError, PeftConfigError, TargetModuleError
from peftlab.layers import AdapterView
from peftlab.registry import MethodSpec, register
from peftlab.surgery import base_of
from peftlab.base_layer import features, is_linear
from peftlab.targeting import describe_candidates, model_type

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
DEFAULT_REDUCTION_FACTOR = 16

# model_type -> (attention output projections, feed-forward output projections), as paths
# relative to one transformer block (``encoder.layer.<i>.``). A path matches only right after
# the block index, so BERT's "output.dense" does not also pick "attention.output.dense".
# Several names per site cover module renames across transformers versions (ViT).
BOTTLENECK_SITES: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["attention.output.dense"], ["output.dense"]),
    "roberta": (["attention.output.dense"], ["output.dense"]),
    "deberta-v2": (["attention.output.dense"], ["output.dense"]),
    "distilbert": (["attention.out_lin"], ["ffn.lin2"]),
    "vit": (["attention.output.dense", "attention.o_proj"], ["output.dense", "mlp.fc2"]),
    "gpt2": (["attn.c_proj"], ["mlp.c_proj"]),
    "llama": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "mistral": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "qwen2": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "qwen3": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "gemma": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "gemma2": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "opt": (["self_attn.out_proj"], ["fc2"]),
    "bart": (["self_attn.out_proj", "encoder_attn.out_proj"], ["fc2"]),
    "t5": (["SelfAttention.o", "EncDecAttention.o"], ["DenseReluDense.wo"]),
}


@dataclass
class BottleneckConfig(LayerConfig):
    """Bottleneck adapter settings.

    Args:
        placement: ``"houlsby"`` (after attention and feed-forward outputs) or ``"pfeiffer"``
            (feed-forward output only). Chooses the default targets; ignored when
            ``target_modules`` is given (then every target gets an adapter).
        reduction_factor: bottleneck width = output size // reduction_factor (default 16).
        bottleneck_size: bottleneck width in units; use instead of reduction_factor.
        non_linearity: ``"relu"``, ``"gelu"`` or ``"swish"`` between the two projections.
        adapter_dropout: dropout on the adapter's input while training.
        init_weights: True starts the up-projection at zero (exactly the base model at init);
            False draws it at random (the model changes at init; for tests).
    """

    peft_type = PeftType.BOTTLENECK

    placement: str = "houlsby"
    reduction_factor: int | float | None = None
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise PeftConfigError(f"BottleneckConfig: placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.non_linearity not in ACTIVATIONS:
            raise PeftConfigError(
                f"BottleneckConfig: non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}."
            )
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise PeftConfigError(
                "BottleneckConfig: set reduction_factor or bottleneck_size, not both (bottleneck_size is the width, "
                "reduction_factor divides the output size to get it)."
            )
        rf = self.reduction_factor
        if rf is not None and (isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0):
            raise PeftConfigError(f"BottleneckConfig: reduction_factor must be a positive number, got {rf!r}.")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise PeftConfigError(f"BottleneckConfig: bottleneck_size must be a positive integer, got {size!r}.")
        p = self.adapter_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise PeftConfigError(f"BottleneckConfig: adapter_dropout must be in [0, 1), got {p!r}.")
        if not isinstance(self.init_weights, bool):
            raise PeftConfigError(f"BottleneckConfig: init_weights must be True or False, got {self.init_weights!r}.")

    def width_for(self, size: int) -> int:
        """Bottleneck width for a projection with ``size`` outputs."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return int(size // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))


class BottleneckAdapter(AdapterView):
    """``out + up(f(down(dropout(out))))`` on one output projection.

    Shapes: out (..., d) -> adapter_down -> (..., m) -> f -> adapter_up -> (..., d).
    """

    def __init__(self, size: int, width: int, non_linearity: str, dropout: float) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(size, width)
        self.adapter_up = nn.Linear(width, size)
        self.non_linearity = ACTIVATIONS[non_linearity]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset(self, zero_up: bool) -> None:
        # down keeps nn.Linear's (Kaiming-uniform) init; a zero up-projection gives identity.
        if zero_up:
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        else:
            nn.init.normal_(self.adapter_up.weight, std=0.5)
            nn.init.normal_(self.adapter_up.bias, std=0.5)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.adapter_dropout(out.to(self.adapter_down.weight.dtype))
        delta = self.adapter_up(self.non_linearity(self.adapter_down(h)))
        return out + delta.to(out.dtype)

    def merge_into(self, base_layer: nn.Module) -> None:
        raise AdapterStateError(
            "bottleneck adapters are a non-linear function of the layer output (W_up f(W_down h)), so they cannot "
            "be folded into the base weights. Keep the PeftModel for inference, or use unload() to drop the adapter."
        )


def make_bottleneck_adapter(base: nn.Module, config: BottleneckConfig, adapter_name: str, module_name: str) -> AdapterView:
    if not is_linear(base):
        raise TargetModuleError(
            f"bottleneck adapters wrap linear output projections; {module_name} is a {type(base).__name__}. "
            f"Target the linear layer that ends the sub-layer (e.g. BERT's attention.output.dense)."
        )
    size = features(base)[1]
    width = config.width_for(size)
    if width < 1:
        raise PeftConfigError(
            f"BottleneckConfig: reduction_factor={config.reduction_factor} leaves no bottleneck for {module_name} "
            f"(output size {size}); use a reduction_factor <= {size} or set bottleneck_size."
        )
    limits.check_allocation("BottleneckConfig", f"the adapter of {module_name}", (2 * size, width))
    adapter = BottleneckAdapter(size, width, config.non_linearity, config.adapter_dropout)
    adapter.reset(zero_up=config.init_weights)
    return adapter


def default_bottleneck_targets(config: BottleneckConfig, model: nn.Module) -> list[str]:
    """Full names of the projections that get an adapter for ``config.placement``."""
    kind = model_type(model)
    if kind not in BOTTLENECK_SITES:
        raise TargetModuleError(
            f"BottleneckConfig: no default adapter placement for model type {kind!r} ({type(model).__name__}). "
            f"Set target_modules to the linear layer that ends each attention block and each feed-forward block "
            f"(their output is added to the residual stream). Linear layers in this model: {describe_candidates(model)}. "
            f"Model types with defaults: {', '.join(sorted(BOTTLENECK_SITES))}."
        )
    attention, feedforward = BOTTLENECK_SITES[kind]
    sites = feedforward if config.placement == "pfeiffer" else attention + feedforward
    pattern = re.compile(rf"(?:.*\.)?\d+\.(?:{'|'.join(re.escape(s) for s in sites)})")
    names = [n for n, m in model.named_modules() if pattern.fullmatch(n) and is_linear(base_of(m))]
    if not names:
        raise TargetModuleError(
            f"BottleneckConfig: the {kind} defaults {sites} match no linear layer of {type(model).__name__} "
            f"(renamed in this transformers version?); set target_modules. Linear layers: {describe_candidates(model)}."
        )
    return names


register(
    MethodSpec(BottleneckConfig, make_bottleneck_adapter, default_targets_for=default_bottleneck_targets, learning_rates=(3e-4, 1e-3, 3e-3))
)

"""IA3: learned rescaling vectors (Liu et al. 2022, https://arxiv.org/abs/2205.05638).

IA3 is LoRA's multiplicative cousin: instead of adding ``B A x`` it multiplies activations by a
learned vector ``l`` that starts at ones. Attention-side layers (keys, values) scale their
output, ``h = l * (W x)``; feed-forward layers scale their input, ``h = W (l * x)``. Both fold
into ``W`` by scaling its rows or columns, so IA3 merges like LoRA does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import base_layer as BL
from peftlab.config import LayerConfig, PeftType
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.layers import AdapterView
from peftlab.registry import MethodSpec, register
from peftlab.targeting import name_matches

IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "distilbert": ["k_lin", "v_lin", "lin2"],
    "vit": ["key", "value", "output.dense", "k_proj", "v_proj", "mlp.fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bart": ["q_proj", "v_proj", "fc2"],
}

IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "distilbert": ["lin2"],
    "vit": ["output.dense", "mlp.fc2"],
    "gpt2": ["mlp.c_proj"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "bloom": ["mlp.dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "phi": ["fc2"],
    "t5": ["wo"],
    "mt5": [],
    "bart": ["fc2"],
}


@dataclass
class IA3Config(LayerConfig):
    """IA3 settings.

    Args:
        feedforward_modules: the targets whose *input* is scaled (a subset of target_modules);
            None uses the default for the model type.
        fan_in_fan_out: the base layer stores weights as (in, out) (GPT-2 Conv1D is detected).
        init_ia3_weights: start the vectors at ones (identity); False draws them at random.
    """

    peft_type = PeftType.IA3
    peftlab_only_fields = ("layers_to_transform", "layers_pattern")

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                raise PeftConfigError(
                    f"IA3Config: feedforward_modules {outside} are not in target_modules {self.target_modules}; "
                    f"every feed-forward module must also be a target. Add them to target_modules or drop them."
                )


class IA3Adapter(AdapterView):
    """One learned vector ``ia3_l``: shape (out, 1) scaling the output, or (1, in) scaling the input.

    For Conv2d the vector is (1, channels, 1, 1).
    """

    def __init__(self, size: int, is_feedforward: bool, conv: bool, init_ones: bool) -> None:
        super().__init__()
        shape = (1, size) if is_feedforward else (size, 1)
        if conv:
            shape = (1, size, 1, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init_ones else torch.randn(shape))
        self.is_feedforward = is_feedforward
        self.transforms_input = is_feedforward
        self.conv = conv

    def _vector(self) -> torch.Tensor:
        return self.ia3_l.view(-1, 1, 1) if self.conv else self.ia3_l.flatten()

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_feedforward:
            return x
        return x * self._vector().to(x.dtype)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return out
        return out * self._vector().to(out.dtype)

    def _weight_factor(self) -> torch.Tensor:
        """The vector shaped to broadcast over the logical (out, in [, kh, kw]) weight: rows or columns."""
        if self.conv:
            return self.ia3_l.transpose(0, 1) if not self.is_feedforward else self.ia3_l
        return self.ia3_l  # (out, 1) or (1, in)

    def _rescale_base(self, base_layer: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            BL.write_weight(base_layer, fn(BL.dense_weight(base_layer), self._weight_factor().to(torch.float32)))
        bias = getattr(base_layer, "bias", None)
        if not self.is_feedforward and bias is not None:
            bias.data = fn(bias.data, self.ia3_l.reshape(bias.shape).to(bias.dtype))

    def merge_into(self, base_layer: nn.Module) -> None:
        self._rescale_base(base_layer, torch.mul)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        # The small epsilon keeps a zero entry from producing inf; exact for nonzero vectors.
        self._rescale_base(base_layer, lambda w, f: torch.div(w, f + 1e-8))


def make_ia3_adapter(base: nn.Module, config: IA3Config, adapter_name: str, module_name: str) -> AdapterView:
    feedforward = name_matches(module_name, config.feedforward_modules, "feedforward_modules")
    if isinstance(base, nn.Conv2d) or BL.is_linear(base):
        if BL.is_linear(base):
            BL.settle_fan_in_fan_out("IA3", base, config)
        in_features, out_features = BL.features(base)
        size = in_features if feedforward else out_features
        return IA3Adapter(size, feedforward, conv=isinstance(base, nn.Conv2d), init_ones=config.init_ia3_weights)
    raise TargetModuleError(
        f"IA3 cannot adapt {module_name} ({type(base).__name__}); it adapts nn.Linear, Conv1D and nn.Conv2d."
    )


def resolve_ia3_config(config: IA3Config, model: nn.Module) -> IA3Config:
    """Fill feedforward_modules from the model type when the user left it out.

    Called after target_modules is resolved; defaults that are not targets are dropped.
    """
    if config.feedforward_modules is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        defaults = IA3_DEFAULT_FEEDFORWARD.get(kind, [])
        if isinstance(config.target_modules, list):
            defaults = [m for m in defaults if m in config.target_modules]
        config.feedforward_modules = list(defaults)
    return config


register(MethodSpec(IA3Config, make_ia3_adapter, IA3_DEFAULT_TARGETS, resolve_config=resolve_ia3_config, learning_rates=(3e-3, 1e-2, 3e-2)))

"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen layer ``h = W x`` becomes ``h = W x + s * B A dropout(x)`` with ``A: (r, in)``,
``B: (out, r)`` and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievic 2023,
https://arxiv.org/abs/2312.03732). ``B`` starts at zero, so the wrapped model equals the base
model until training moves it. Because ``B A`` is a plain matrix, it can be merged into ``W``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftlab import base_layer as BL
from peftlab import functional as Fn
from peftlab import limits
from peftlab.config import LayerConfig, PeftType
from peftlab.errors import PeftConfigError, TargetModuleError, caller_stacklevel
from peftlab.layers import LayerWrapper, AdapterView, ModulesToSave
import peftlab.methods.lora.init as lora_init
from peftlab.methods.lora.dora import make_dora_adapter
from peftlab.methods.lora.layers import LoraConv2d, LoraEmbedding, LoraLinear
from peftlab.methods.trainable_tokens import TokenRows, add_token_rows, check_token_indices
from peftlab.registry import MethodSpec, register
from peftlab.targeting import pattern_value

# Default targets per model type (the attention query/value projections, as in the paper).
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "vit": ["query", "value", "q_proj", "v_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
}

@dataclass
class LoraConfig(LayerConfig):
    """LoRA settings.

    Args:
        r: rank of the update ``B A``; more rank, more capacity and parameters.
        lora_alpha: numerator of the scaling; keeping alpha fixed while changing r changes
            the effective learning rate of the adapter, which is why rsLoRA exists.
        lora_dropout: dropout on the adapter's input only (the base path is untouched).
        fan_in_fan_out: the base layer stores weights as (in, out); forced on for GPT-2 Conv1D.
        bias: "none", "all" (train every bias in the model) or "lora_only" (biases of adapted layers).
        use_rslora: scale by alpha / sqrt(r) so the update's size does not shrink with rank.
        init_lora_weights: True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
            False (both random: the model changes at init; for tests only), or one that reads the
            base weight (:mod:`peftlab.methods.lora.init`): "pissa" / "pissa_niter_K" (top singular
            directions; the base keeps the residual), "olora" (QR; the base keeps the residual),
            "orthogonal" (B A = 0 from orthogonal halves; even r). To turn a trained PiSSA/OLoRA
            adapter into a plain LoRA for the original base, save it with
            ``save_pretrained(..., path_initial_model_for_weight_conversion=<folder of its initial save>)``.
        rank_pattern / alpha_pattern: per-module overrides, keyed by a regex matched against
            the end of the module name (e.g. ``{"value": 16}``).
        use_dora: weight-decomposed LoRA (DoRA, :mod:`peftlab.methods.lora.dora`): a trained
            per-row magnitude times the direction of ``W + s B A``; Linear and Conv1D only.
        lora_bias: give B a bias too (trained, saved as ``lora_B.bias``): the update becomes ``s (B A x + b)``;
            merging adds ``s b`` to the base layer's bias, so it needs one. Not on embeddings, nor with DoRA.
        trainable_token_indices: also train these rows of the input embedding (a list of token ids),
            or of named embeddings (``{"embed_tokens": [...]}``), without training the whole table
            (:mod:`peftlab.methods.trainable_tokens`); a tied output head follows the trained rows.
    """

    peft_type = PeftType.LORA
    unsupported_peft_fields = {
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "megatron_config": None,
        "target_parameters": None,
        "use_qalora": False,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "use_bdlora": None,
        "kasa_config": None,
        "lora_ga_config": None,
        "monteclora_config": None,
        "velora_config": None,
        "ensure_weight_tying": False,
        "astra_config": None,  # peft 0.22
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    lora_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PeftConfigError(f"LoraConfig: r must be a positive integer, got {self.r!r}; try r=8.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise PeftConfigError(f"LoraConfig: lora_alpha must be a finite number, got {self.lora_alpha!r}.")
        limits.check_scale("LoraConfig", "lora_alpha / r", Fn.lora_scaling(self.r, float(self.lora_alpha), self.use_rslora))
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise PeftConfigError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise PeftConfigError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        self._check_rank_pattern()
        if isinstance(self.trainable_token_indices, dict):
            self.trainable_token_indices = {
                k: check_token_indices(f"LoraConfig: trainable_token_indices[{k!r}]", v) for k, v in self.trainable_token_indices.items()
            }
        elif self.trainable_token_indices is not None:
            self.trainable_token_indices = check_token_indices("LoraConfig: trainable_token_indices", self.trainable_token_indices)
        lora_init.check_init(self.init_lora_weights, [self.r, *(self.rank_pattern or {}).values()])
        if not isinstance(self.lora_bias, bool):
            raise PeftConfigError(f"LoraConfig: lora_bias must be True or False, got {self.lora_bias!r}.")
        if self.lora_bias and (self.use_dora or not isinstance(self.init_lora_weights, bool)):
            raise PeftConfigError(f"LoraConfig: lora_bias=True works with plain LoRA and init_lora_weights True or False "
                                  f"(as in peft), not with use_dora={self.use_dora}, init_lora_weights={self.init_lora_weights!r}.")
        if self.use_dora and lora_init.needs_base(self.init_lora_weights):
            raise PeftConfigError(
                f"LoraConfig: init_lora_weights={self.init_lora_weights!r} with use_dora=True is not implemented in peftlab; "
                f"use one of them."
            )
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and lora_init.changes_base(self.init_lora_weights):
            warnings.warn(
                "LoraConfig: with use_rslora and rank_pattern/alpha_pattern, a PiSSA/OLoRA adapter cannot be converted "
                "to a plain LoRA on save (path_initial_model_for_weight_conversion); drop one of them if you need that.",
                stacklevel=caller_stacklevel(),
            )

    def _check_rank_pattern(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise PeftConfigError(f"LoraConfig: {name} must be a dict of module-name regex -> value, got {getattr(self, name)!r}.")
        for key in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(key)
            except re.error as exc:
                raise PeftConfigError(f"LoraConfig: pattern key {key!r} is not a valid regular expression ({exc}).") from None
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise PeftConfigError(f"LoraConfig: alpha_pattern[{key!r}] must be a finite number, got {alpha!r}.")
            limits.check_scale("LoraConfig", f"alpha_pattern[{key!r}] / r", float(alpha))
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise PeftConfigError(f"LoraConfig: rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")

def lora_bias_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    """Biases trained and saved with the adapter (``bias="all"`` / ``"lora_only"``), keyed by their path in the model."""
    if config.bias == "none":
        return {}
    skip = {
        id(p)
        for m in model.modules()
        if isinstance(m, (LayerWrapper, ModulesToSave))
        for p in (
            [q for a in m.adapters.values() for q in a.held_parameters()] if isinstance(m, LayerWrapper) else m.parameters()
        )
    }
    if config.bias == "all":
        return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and id(p) not in skip}
    return {
        f"{name}.base_layer.bias": m.base_layer.bias
        for name, m in model.named_modules()
        if isinstance(m, LayerWrapper) and adapter_name in m.adapters and getattr(m.base_layer, "bias", None) is not None
        and not isinstance(m.adapters[adapter_name], TokenRows)  # rows of trainable_token_indices: not a LoRA layer
    }


def make_lora_adapter(base: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> AdapterView:
    """Build the LoRA adapter that fits ``base``'s layer type."""
    r = int(pattern_value(config.rank_pattern, module_name, config.r))
    given_alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)  # kept as given, as peft shows it
    alpha = float(given_alpha)
    scaling = Fn.lora_scaling(r, alpha, config.use_rslora)
    limits.check_rank("LoRA", r, base, module_name)  # before any factor is allocated
    if config.use_dora:
        if BL.is_quantized(base):
            raise TargetModuleError(
                f"DoRA cannot adapt {module_name}: its base weight is 4-/8-bit quantized and DoRA reads it in every "
                f"forward. Use plain LoRA (use_dora=False) on quantized bases."
            )
        return _with_hyperparameters(make_dora_adapter(base, r, scaling, config, module_name), r, given_alpha, config)
    adapter: AdapterView
    if config.lora_bias and getattr(base, "bias", None) is None:
        warnings.warn(f"LoRA: lora_bias=True on {module_name}, which has no bias: the adapter trains a bias but cannot be "
                      f"merged there.", stacklevel=caller_stacklevel())
    if isinstance(base, nn.Embedding):
        if config.lora_bias:
            raise TargetModuleError(f"LoRA: lora_bias=True does not work on embeddings ({module_name}), as in peft; "
                                    f"exclude it or set lora_bias=False.")
        adapter = LoraEmbedding(base, r, scaling)
    elif isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TargetModuleError(f"LoRA: {module_name} is a grouped Conv2d (groups={base.groups}); exclude it.")
        adapter = LoraConv2d(base, r, scaling, config.lora_dropout, bias=config.lora_bias)
    elif BL.is_linear(base):
        transposed = BL.settle_fan_in_fan_out("LoRA", base, config)
        in_features, out_features = BL.features(base)
        adapter = LoraLinear(in_features, out_features, r, scaling, config.lora_dropout, fan_in_fan_out=transposed,
                             bias=config.lora_bias)
        if lora_init.needs_base(config.init_lora_weights):
            _init_from_base(adapter, base, config.init_lora_weights, module_name)
            return _with_hyperparameters(adapter, r, given_alpha, config)
    else:
        raise TargetModuleError(
            f"LoRA cannot adapt {module_name} ({type(base).__name__}); it adapts nn.Linear, Conv1D, "
            f"nn.Embedding and nn.Conv2d. Target that module's linear sublayers instead."
        )
    init = config.init_lora_weights
    if lora_init.needs_base(init):
        if isinstance(adapter, LoraConv2d):
            raise TargetModuleError(f"LoRA: init_lora_weights={init!r} works on linear layers only, and {module_name} is a Conv2d; "
                                    f"exclude it or use init_lora_weights=True.")
        warnings.warn(f"LoRA: init_lora_weights={init!r} applies to linear layers; embedding {module_name} gets the default init "
                      f"(as in peft).", stacklevel=caller_stacklevel())
        init = True
    adapter.reset(init)
    return _with_hyperparameters(adapter, r, given_alpha, config)


def _with_hyperparameters(adapter: AdapterView, r: int, alpha: float, config: LoraConfig) -> AdapterView:
    """Record what peft's layers show per adapter (``layer.r["default"]``, ``layer.lora_alpha[...]``)."""
    adapter.r, adapter.lora_alpha = r, alpha
    adapter.use_dora, adapter.use_rslora = bool(config.use_dora), bool(config.use_rslora)
    adapter.lora_bias = bool(config.lora_bias)
    return adapter


def _init_from_base(adapter: LoraLinear, base: nn.Module, init: str, module_name: str) -> None:
    """PiSSA, OLoRA or orthogonal factors for a linear ``base`` (see :mod:`peftlab.methods.lora.init`)."""
    r = adapter.lora_A.out_features
    if init == "orthogonal":
        lora_a, lora_b = lora_init.orthogonal_factors(adapter.lora_A.in_features, adapter.lora_B.out_features, r)
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        adapter.start_from(lora_a.to(dtype), lora_b.to(dtype), take_from_base=False)  # peft rounds them to the base dtype
        return
    if init.startswith("pissa") and BL.is_quantized(base):
        raise TargetModuleError(
            f"LoRA: PiSSA cannot start from the 4-/8-bit weight of {module_name}; initialise it on the full-precision model, "
            f"then quantize the residual model."
        )
    weight = BL.dense_weight(base).to(torch.float32)
    if init == "olora":
        lora_a, lora_b = lora_init.olora_factors(weight, r)
    else:
        lora_a, lora_b = lora_init.pissa_factors(weight, r, adapter.scaling, init)
    adapter.start_from(lora_a, lora_b, take_from_base=True)


def _add_token_rows(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    if config.trainable_token_indices is not None:
        add_token_rows(model, config.trainable_token_indices, adapter_name, skip=config.modules_to_save or ())


register(MethodSpec(LoraConfig, make_lora_adapter, LORA_DEFAULT_TARGETS, extra_tensors=lora_bias_parameters, learning_rates=(3e-4, 1e-3, 3e-3),
                    after_add=_add_token_rows))

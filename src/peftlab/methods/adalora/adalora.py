"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512).

Each adapted layer gets an update in SVD form,

    h = W x + s / (n + 1e-5) * P diag(lambda) Q x        Q: (r, in), lambda: (r, 1), P: (out, r)

stored as ``lora_A`` (Q), ``lora_E`` (lambda) and ``lora_B`` (P), with ``s = lora_alpha`` and
``n = ranknum``, the initial rank (kept fixed so pruning a triplet never rescales the rest).
During training a global rank budget shrinks from ``init_r`` per layer to ``target_r`` per
layer on a cubic schedule: the least important triplets (P_i, lambda_i, Q_i) get lambda_i = 0.
That per-step work and the orthogonality regulariser on P and Q are explicit training hooks
(:mod:`peftlab.methods.adalora.budget`, :mod:`peftlab.methods.adalora.callback`); forward never changes
the loss.

After allocation the config's ``rank_pattern`` records, per layer, which triplets survived
(``{"<module>.lora_E": [bool] * init_r}``). Checkpoints keep only those rows, exactly as peft
0.21 writes them, and an adapter built from a config with a ``rank_pattern`` has those smaller
shapes from the start.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import functional as Fn
from peftlab import limits
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.layers import LayerWrapper, AdapterView, iter_wrappers
from peftlab.methods.lora import LoraConfig, lora_bias_parameters
from peftlab.registry import MethodSpec, register

if TYPE_CHECKING:
    from peftlab.methods.adalora.budget import ImportanceState

# Default targets per model type (peft's AdaLoRA table: more projections than LoRA's q/v,
# since the budget allocator decides where rank goes).
ADALORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
}

_E_SUFFIX = ".lora_E"


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings (names and defaults as peft's ``AdaLoraConfig``).

    Training runs in three phases over ``total_step`` optimizer steps: ``tinit`` warm-up steps at
    full rank, a budget phase in which the total rank falls on a cubic curve from
    ``init_r * layers`` to ``target_r * layers`` (re-allocated every ``deltaT`` steps), and
    ``tfinal`` steps that fine-tune the final allocation.

    Args:
        init_r: rank each layer starts with.
        target_r: average rank per layer after allocation (at most ``init_r``).
        tinit: warm-up steps before any rank is pruned.
        tfinal: steps at the end that keep the final allocation fixed.
        deltaT: re-allocate the budget every this many steps during the budget phase.
        beta1: EMA factor of the smoothed sensitivity |w * grad|.
        beta2: EMA factor of its uncertainty |sensitivity - smoothed sensitivity|.
        orth_reg_weight: weight of the penalty ||P^T P - I|| + ||Q Q^T - I|| that keeps P, Q
            near-orthogonal, so lambda acts like singular values.
        total_step: number of optimizer steps of the run; required (the schedule needs it).
        rank_pattern: set by the allocator: per ``"<module>.lora_E"`` which of the ``init_r``
            triplets are kept. None before allocation.
        lora_alpha: the update is scaled by ``lora_alpha / init_r`` (not by r: ranks change).
        r, use_rslora, alpha_pattern: LoRA fields that AdaLoRA ignores (as in peft).
    """

    peft_type = PeftType.ADALORA

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        name = "AdaLoraConfig"
        for key in ("init_r", "target_r", "deltaT"):
            _require_int(key, getattr(self, key), minimum=1)
        for key in ("tinit", "tfinal"):
            _require_int(key, getattr(self, key), minimum=0)
        super().__post_init__()  # LoRA's checks, then rank_pattern against init_r
        if self.use_dora:
            raise PeftConfigError(f"{name}: use_dora=True is not available for AdaLoRA; use LoraConfig(use_dora=True).")
        if self.trainable_token_indices is not None or self.lora_bias or self.init_lora_weights not in (True, False, "gaussian"):
            raise PeftConfigError(f"{name}: trainable_token_indices, lora_bias and init_lora_weights={self.init_lora_weights!r} are "
                                  f"LoraConfig options peftlab does not offer for AdaLoRA; use LoraConfig.")
        if self.r != 8:
            warnings.warn(f"{name}: r is not used by AdaLoRA; set the starting rank with init_r.", stacklevel=3)
        if self.use_rslora or self.alpha_pattern:
            warnings.warn(f"{name}: use_rslora and alpha_pattern have no effect; AdaLoRA scales by lora_alpha / init_r.", stacklevel=3)
        if self.target_r > self.init_r:
            raise PeftConfigError(
                f"{name}: target_r={self.target_r} is larger than init_r={self.init_r}; the budget only shrinks. "
                f"Lower target_r or raise init_r."
            )
        if self.total_step is None:
            raise PeftConfigError(
                f"{name}: total_step is missing; set it to the number of optimizer steps of the run "
                f"(e.g. TrainingArguments.max_steps), which the rank schedule needs."
            )
        _require_int("total_step", self.total_step, minimum=1)
        if self.tinit + self.tfinal >= self.total_step:
            raise PeftConfigError(
                f"{name}: tinit + tfinal = {self.tinit + self.tfinal} leaves no budget phase in total_step="
                f"{self.total_step} steps; make tinit + tfinal smaller than total_step."
            )
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise PeftConfigError(f"{name}: {key} must be in (0, 1), got {value!r}; the default is 0.85.")
        weight = self.orth_reg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
            raise PeftConfigError(f"{name}: orth_reg_weight must be a finite number >= 0, got {weight!r}.")

    def _check_rank_pattern(self) -> None:
        """Validate and normalise ``rank_pattern`` to ``{"<module>.lora_E": [bool, ...]}``."""
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise PeftConfigError(f"AdaLoraConfig: rank_pattern must be None or a dict, got {self.rank_pattern!r}.")
        normalised: dict[str, list[bool]] = {}
        for key, mask in self.rank_pattern.items():
            if not isinstance(key, str) or ".lora_E" not in f".{key}":
                raise PeftConfigError(
                    f"AdaLoraConfig: rank_pattern key {key!r} must name a layer's lora_E "
                    f"(e.g. 'encoder.layer.0.attention.self.query.lora_E'); rank_pattern is written by the allocator."
                )
            if isinstance(mask, torch.Tensor):
                mask = mask.view(-1).tolist()
            if not isinstance(mask, (list, tuple)) or not all(isinstance(b, bool) for b in mask):
                raise PeftConfigError(f"AdaLoraConfig: rank_pattern[{key!r}] must be a list of booleans, got {mask!r}.")
            if len(mask) != self.init_r:
                raise PeftConfigError(
                    f"AdaLoraConfig: rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}; "
                    f"the pattern belongs to a config with another init_r."
                )
            normalised[module_of_pattern_key(key) + _E_SUFFIX] = list(mask)
        self.rank_pattern = normalised

    def kept_rows(self, module_name: str) -> list[bool] | None:
        """Which of the ``init_r`` triplets of ``module_name`` the allocation keeps (None: all)."""
        if not self.rank_pattern:
            return None
        return self.rank_pattern.get(module_name + _E_SUFFIX)

def module_of_pattern_key(key: str) -> str:
    """``"a.b.lora_E"`` or peft's in-memory ``"a.b.lora_E.default"`` -> ``"a.b"``."""
    if key.endswith(_E_SUFFIX):
        return key[: -len(_E_SUFFIX)]
    return key.rsplit(_E_SUFFIX + ".", 1)[0]


def _require_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PeftConfigError(f"AdaLoraConfig: {key} must be an integer >= {minimum}, got {value!r}.")


class SvdAdapter(AdapterView):
    """AdaLoRA's SVD-form update on nn.Linear, GPT-2 Conv1D or nn.Conv2d.

    Shapes: ``lora_A`` (r, in) [Conv2d: (r, in * kh * kw)], ``lora_E`` (r, 1), ``lora_B`` (out, r).
    ``r`` is ``init_r``, or the allocated rank when built from a ``rank_pattern``. ``ranknum``
    (a frozen parameter, left out of adapter files as in peft) holds ``init_r``.
    """

    unsaved = ("ranknum",)
    per_adapter = ("r", "lora_alpha", "scaling")

    def __init__(
        self, base: nn.Module, r: int, init_r: int, lora_alpha: float, dropout: float, fan_in_fan_out: bool
    ) -> None:
        super().__init__()
        self.r, self.lora_alpha = r, lora_alpha
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight_shape = BL.weight_shape(base)  # (out, in), or the Conv2d kernel
        out_dim, in_dim = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if self.is_conv:
            self._conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        # Declared in peft's order (A, B, E), so the layer's state_dict lists them as peft's does.
        self.lora_A = nn.Parameter(torch.empty(r, in_dim))
        self.lora_B = nn.Parameter(torch.empty(out_dim, r))
        self.lora_E = nn.Parameter(torch.empty(r, 1))
        # A frozen parameter, as in peft (so the layer holds ``ranknum.<adapter>``); not saved in files.
        self.ranknum = nn.Parameter(torch.tensor([float(init_r)]), requires_grad=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(lora_alpha) if lora_alpha > 0 else float(init_r)  # peft's rule
        self.fan_in_fan_out = fan_in_fan_out
        # Importance EMAs kept by the budget allocator while training (not saved).
        self.importance: ImportanceState | None = None

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    def reset(self, identity: bool) -> None:
        """Identity: lambda = 0 and small random P, Q (as peft); else all factors ~ N(0, 1)."""
        if identity:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        else:
            for param in (self.lora_A, self.lora_E, self.lora_B):
                nn.init.normal_(param)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's logical layout ((out, in), or the Conv2d kernel)."""
        return Fn.svd_delta(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum).reshape(self.weight_shape)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.is_conv:
            delta = Fn.svd_delta(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum)
            extra = F.conv2d(x, delta.reshape(self.weight_shape), **self._conv)
        else:
            extra = F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.scaling / (self.ranknum + 1e-5)
        return out + extra.to(out.dtype)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, self.delta_weight())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -self.delta_weight())


def make_adalora_adapter(base: nn.Module, config: AdaLoraConfig, adapter_name: str, module_name: str) -> AdapterView:
    """Build the SVD adapter for one layer; a ``rank_pattern`` entry sets its allocated rank."""
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TargetModuleError(f"AdaLoRA: {module_name} is a grouped Conv2d (groups={base.groups}); exclude it.")
        fan_in_fan_out = False
    elif BL.is_linear(base):
        fan_in_fan_out = BL.settle_fan_in_fan_out("AdaLoRA", base, config)  # GPT-2 Conv1D stores (in, out)
    else:
        raise TargetModuleError(
            f"AdaLoRA cannot adapt {module_name} ({type(base).__name__}); it adapts nn.Linear, Conv1D and "
            f"nn.Conv2d. Target that module's linear sublayers instead."
        )
    kept = config.kept_rows(module_name)
    limits.check_rank("AdaLoRA", config.init_r, base, module_name)  # before any factor is allocated
    r = config.init_r if kept is None else sum(kept)
    adapter = SvdAdapter(base, r, config.init_r, config.lora_alpha, config.lora_dropout, fan_in_fan_out)
    adapter.reset(identity=bool(config.init_lora_weights))
    return adapter


def adalora_disk_tensors(config: AdaLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as written to disk: each full-size layer cut to the rows its rank_pattern keeps.

    Layers already built at their allocated size (loaded from such a checkpoint) are left as
    they are. Keys are module paths plus ``.lora_A`` / ``.lora_E`` / ``.lora_B``.
    """
    if not config.rank_pattern:
        return tensors
    out = dict(tensors)
    for key, mask in config.rank_pattern.items():
        module = module_of_pattern_key(key)
        keep = torch.tensor(mask, dtype=torch.bool)
        for suffix, dim in ((".lora_A", 0), (".lora_E", 0), (".lora_B", 1)):
            name = module + suffix
            if name in out and out[name].shape[dim] == len(mask):
                out[name] = out[name].index_select(dim, keep.nonzero().view(-1).to(out[name].device))
    return out


def svd_adapters(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, SvdAdapter]]:
    """(module path, adapter) for every AdaLoRA adapter named ``adapter_name`` in ``model``."""
    for path, wrapper in iter_wrappers(model):
        if isinstance(wrapper, LayerWrapper) and adapter_name in wrapper.adapters:
            adapter = wrapper.adapters[adapter_name]
            if isinstance(adapter, SvdAdapter):
                yield path, adapter


register(
    MethodSpec(
        AdaLoraConfig,
        make_adalora_adapter,
        ADALORA_DEFAULT_TARGETS,
        extra_tensors=lora_bias_parameters,
        disk_tensors=adalora_disk_tensors,
        step_count_options=("total_step",),
        trainer_callbacks=("peftlab.methods.adalora.callback:AdaLoraCallback",),
        learning_rates=(3e-4, 1e-3, 3e-3),
    )
)

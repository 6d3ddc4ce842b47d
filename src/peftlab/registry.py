"""Method registry: a method's name -> its :class:`MethodSpec`, the one place a method is declared.

Adding a method is one ``register(...)`` call in its own module under ``methods/<family>/``; the rest
of the library (and the workbench, whose method tables derive from the specs) looks methods up
here and never names them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from torch import nn

from peftlab.errors import PeftConfigError

if TYPE_CHECKING:
    import torch

    from peftlab.config import PeftConfig
    from peftlab.layers import AdapterView
    from peftlab.tuners import Tuner

# (base layer, config, adapter name, module path) -> the adapter module for that layer.
AdapterFactory = Callable[[nn.Module, "PeftConfig", str, str], "AdapterView"]
# (base model, resolved config) -> one model-level adapter (prompt methods): PeftModel keeps it in
# ``prompt_encoder[adapter name]`` and lets it rewrite the inputs of forward / generate.
ModelAdapterFactory = Callable[[nn.Module, "PeftConfig"], nn.Module]


# (model, spec) -> the tuner that drives this method's adapters on ``model`` (see peftlab.tuners).
TunerFactory = Callable[[nn.Module, "MethodSpec"], "Tuner"]
# (model, config, adapter name) -> base-model parameters the method also trains and saves
# (LoRA's ``bias="all"/"lora_only"``), keyed by their path in the model.
ExtraTensors = Callable[[nn.Module, "PeftConfig", str], dict[str, nn.Parameter]]
# (config, adapter tensors) -> the tensors as written to disk (AdaLoRA keeps only allocated ranks).
DiskTensors = Callable[["PeftConfig", dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library and the workbench need to know about one method.

    A method adapts layers (``make_adapter``), the model's inputs (``make_model_adapter``, the
    prompt methods) or neither (a custom ``make_tuner``, e.g. selective tuning, which trains tensors
    the model already has); :func:`peftlab.tuners.tuner_for` builds the matching tuner kind
    (the registry imports no tuner code, so every module may look methods up here).

    Args:
        config_cls: the method's config dataclass (its ``peft_type`` is the registry key).
        make_adapter: builds the adapter module for one target layer.
        default_targets: model_type -> target module names used when target_modules is None.
        resolve_config: fills model-dependent defaults into a (copied) config before injection.
        make_model_adapter: builds the one model-level adapter module of a prompt method.
        default_targets_for: (config, model) -> target module names, for methods whose defaults
            depend on the config (bottleneck placement); used instead of ``default_targets``.
        make_tuner: (model, spec) -> the :class:`~peftlab.tuners.Tuner` that drives the method;
            None picks LayerTuner for ``make_adapter`` and PromptTuner for ``make_model_adapter``.
        extra_tensors: base-model parameters trained and saved with an adapter (LoRA's biases).
        disk_tensors: rewrites an adapter's tensors into their on-disk form (AdaLoRA's pruned ranks).
        supports_quantized: False when the method cannot work on a 4-/8-bit base; it is then
            refused before the model changes.
        run_defaults: options a workbench run gets when it leaves them out (the library keeps them
            required, like peft; on the command line a working default is friendlier).
        step_count_options: config fields that depend on the run's length (AdaLoRA's ``total_step``);
            the workbench fills them from the optimizer step count.
        trainer_callbacks: "module:Class" names of transformers ``TrainerCallback`` classes the
            method needs in training (AdaLoRA's rank budget); imported only when a run trains.
        after_add: (model, config, adapter name) -> None, run after the target layers are adapted: more
            adapters the config asks for (LoRA's ``trainable_token_indices``, a tied output head
            following trained embedding rows); whatever it adds is undone with the adapter.
        learning_rates: a sensible learning-rate grid to sweep for this method (the workbench's
            default sweep); methods differ by orders of magnitude, so one shared grid would
            judge some of them at a bad rate.
    """

    config_cls: type["PeftConfig"]
    make_adapter: AdapterFactory | None = None
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    resolve_config: Callable[["PeftConfig", nn.Module], "PeftConfig"] | None = None
    make_model_adapter: ModelAdapterFactory | None = None
    default_targets_for: Callable[["PeftConfig", nn.Module], list[str]] | None = None
    make_tuner: TunerFactory | None = None
    extra_tensors: ExtraTensors | None = None
    disk_tensors: DiskTensors | None = None
    supports_quantized: bool = True
    run_defaults: dict[str, Any] = field(default_factory=dict)
    step_count_options: tuple[str, ...] = ()
    trainer_callbacks: tuple[str, ...] = ()
    learning_rates: tuple[float, ...] = ()
    after_add: Callable[[nn.Module, "PeftConfig", str], None] | None = None

    def __post_init__(self) -> None:
        factories = (self.make_adapter, self.make_model_adapter)
        if sum(f is not None for f in factories) > 1 or (self.make_tuner is None and not any(factories)):
            raise PeftConfigError(
                f"{self.config_cls.__name__}: register exactly one of make_adapter (layer method), "
                f"make_model_adapter (prompt method) or make_tuner (method without surgery)."
            )
        unknown = [
            name for name in (*self.run_defaults, *self.step_count_options)
            if name not in {f.name for f in fields(self.config_cls)}
        ]
        if unknown:
            raise PeftConfigError(f"{self.config_cls.__name__}: run defaults / step-count options name no config field: {unknown}.")


_METHODS: dict[str, MethodSpec] = {}
# Method-family packages; importing one imports the modules that register its methods (its
# ``__init__``). Imported lazily on first lookup.
_BUILTIN_MODULES = (
    "peftlab.methods.lora",
    "peftlab.methods.adalora",
    "peftlab.methods.lycoris",
    "peftlab.methods.ia3",
    "peftlab.methods.bottleneck",
    "peftlab.methods.selective",
    "peftlab.methods.prompt",
    "peftlab.methods.trainable_tokens",
    "peftlab.methods.vera",
    "peftlab.methods.oft",
)


def register(spec: MethodSpec) -> MethodSpec:
    key = getattr(spec.config_cls.peft_type, "value", spec.config_cls.peft_type)
    if key in _METHODS and _METHODS[key] is not spec:
        raise PeftConfigError(f"method {key} is registered twice")
    _METHODS[key] = spec
    return spec


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def method_for(peft_type: str) -> MethodSpec:
    _load_builtins()
    key = getattr(peft_type, "value", peft_type)
    if not isinstance(key, str) or key not in _METHODS:
        raise PeftConfigError(f"unknown peft_type {key!r}; peftlab implements: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def config_class_for(peft_type: str) -> type["PeftConfig"]:
    return method_for(peft_type).config_cls


def registered_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def registered_specs() -> dict[str, MethodSpec]:
    """Every registered method's spec by registry key (``peft_type``)."""
    _load_builtins()
    return dict(sorted(_METHODS.items()))

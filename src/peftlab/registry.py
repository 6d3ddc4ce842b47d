"""Method registry: a method's name -> its config class and its adapter factory.

Adding a method is one ``register(...)`` call in its own module under ``methods/``; the rest
of the library looks methods up here and never names them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from torch import nn

from peftlab.errors import PeftConfigError

if TYPE_CHECKING:
    import torch

    from peftlab.config import PeftConfig
    from peftlab.layers import LayerAdapter

# (base layer, config, adapter name, module path) -> the adapter module for that layer.
AdapterFactory = Callable[[nn.Module, "PeftConfig", str, str], "LayerAdapter"]
# (base model, resolved config) -> one model-level adapter (prompt methods): PeftModel keeps it in
# ``prompt_encoder[adapter name]`` and lets it rewrite the inputs of forward / generate.
ModelAdapterFactory = Callable[[nn.Module, "PeftConfig"], nn.Module]


class ModelTuner(Protocol):
    """The value store of a method that trains tensors the model already has (selective tuning).

    One store per model holds every adapter of its method;
    :class:`peftlab.tuners.selective.SelectiveTuner` drives it.
    """

    def add(self, adapter_name: str, config: "PeftConfig") -> None:
        """Register an adapter; raise before changing anything when the config selects nothing."""

    def remove(self, adapter_name: str) -> None:
        """Forget an adapter; the model gets back the base values of its tensors if it was active."""

    def activate(self, adapter_name: str) -> None:
        """Put this adapter's values into the model (the previous active one is stashed)."""

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the model holds the base values."""

    def tensors(self, adapter_name: str) -> dict[str, "torch.Tensor"]:
        """The adapter's tensors by parameter name: the live ones if active, stored values if not."""

    def finish(self, keep: str | None) -> None:
        """Drop the tuner's state: keep adapter ``keep``'s values in the model, or the base values."""


@dataclass(frozen=True)
class MethodSpec:
    """What the library needs to know about one method.

    A method either adapts layers (``make_adapter``) or the model's inputs (``make_model_adapter``,
    the prompt methods); exactly one of the two is given.

    Args:
        config_cls: the method's config dataclass (its ``peft_type`` is the registry key).
        make_adapter: builds the adapter module for one target layer.
        default_targets: model_type -> target module names used when target_modules is None.
        resolve_config: fills model-dependent defaults into a (copied) config before injection.
        make_model_adapter: builds the one model-level adapter module of a prompt method.
        default_targets_for: (config, model) -> target module names, for methods whose defaults
            depend on the config (bottleneck placement); used instead of ``default_targets``.
        make_tuner: builds the :class:`ModelTuner` of a method that does no surgery (selective).
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
    make_tuner: Callable[[nn.Module], ModelTuner] | None = None
    learning_rates: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        factories = (self.make_adapter, self.make_model_adapter, self.make_tuner)
        if sum(f is not None for f in factories) != 1:
            raise PeftConfigError(
                f"{self.config_cls.__name__}: register exactly one of make_adapter (layer method), "
                f"make_model_adapter (prompt method) or make_tuner (method without surgery)."
            )


_METHODS: dict[str, MethodSpec] = {}
# Modules that register the built-in methods; imported lazily on first lookup.
_BUILTIN_MODULES = (
    "peftlab.methods.lora",
    "peftlab.methods.ia3",
    "peftlab.methods.loha",
    "peftlab.methods.lokr",
    "peftlab.methods.adalora",
    "peftlab.methods.prompt_tuning",
    "peftlab.methods.prefix_tuning",
    "peftlab.methods.p_tuning",
    "peftlab.methods.bottleneck",
    "peftlab.methods.selective",
)


def register(spec: MethodSpec) -> MethodSpec:
    key = spec.config_cls.peft_type.value
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

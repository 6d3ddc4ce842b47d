"""The peft names trl's trainers test against, widened to peftlab's.

trl's trainers import ``PeftConfig``, ``PeftModel``, ``LoraConfig``, ``PrefixTuningConfig``,
``get_peft_model`` and ``BaseTunerLayer`` from peft when peft is installed, and then decide with
``isinstance`` and ``is_peft_available()``: ``SFTTrainer(peft_config=peftlab.LoraConfig(...))`` is
refused ("must be a peft.PeftConfig"), and without peft the same code raises ``NameError``.
:func:`bindings_for` gives, for one trl module, each of those names bound to a class that answers
``isinstance`` for peft's and peftlab's objects alike (and otherwise behaves as peft's class, or as
peftlab's without peft), and a ``get_peft_model`` that builds a peftlab model from a peftlab config
and hands peft's configs to peft. trl's own code around the call (gradient-checkpointing input
grads, QLoRA's bf16 adapters, the reference adapter of DPO) then applies to peftlab models as to
peft's.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any

# The peft API level peftlab follows; trl compares it with version gates that concern peft's bugs.
PEFT_API_VERSION = "0.22.0"

# name in trl -> (peft's module, peft's name, peftlab's public name); None = peftlab's LayerWrapper.
_CLASSES: dict[str, tuple[str, str, str | None]] = {
    "PeftConfig": ("peft", "PeftConfig", "PeftConfig"),
    "PeftModel": ("peft", "PeftModel", "PeftModel"),
    "LoraConfig": ("peft", "LoraConfig", "LoraConfig"),
    "PrefixTuningConfig": ("peft", "PrefixTuningConfig", "PrefixTuningConfig"),
    "PromptLearningConfig": ("peft", "PromptLearningConfig", "PromptLearningConfig"),
    "BaseTunerLayer": ("peft.tuners.tuners_utils", "BaseTunerLayer", None),
}


class _EitherMeta(type):
    """``isinstance``/``issubclass`` true for any member; calls and attributes go to the first member."""

    members: tuple[type, ...]

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.members)

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and issubclass(sub, cls.members)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.members[0](*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name == "members":
            raise AttributeError(name)
        return getattr(cls.members[0], name)


def either(name: str, *members: type) -> type:
    """A stand-in class named ``name`` whose instances are the instances of ``members``."""
    return _EitherMeta(name, (), {"members": members, "__doc__": f"peft's or peftlab's {name}."})


def is_widened(value: Any) -> bool:
    return isinstance(value, _EitherMeta) or getattr(value, "_peftlab_dispatch", False)


def _peft_class(module: str, name: str) -> type | None:
    if importlib.util.find_spec("peft") is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _peftlab_class(name: str | None) -> type:
    import peftlab
    from peftlab.layers import LayerWrapper

    return LayerWrapper if name is None else getattr(peftlab, name)


def dispatching_get_peft_model(original: Any) -> Any:
    """``get_peft_model`` that builds a peftlab model for a peftlab config and calls peft's otherwise."""
    import peftlab

    def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(peft_config, peftlab.PeftConfig):
            return peftlab.get_peft_model(model, peft_config, *args, **kwargs)
        if original is None:
            raise TypeError(f"get_peft_model: {type(peft_config).__name__} is not a peftlab config and peft is not installed.")
        return original(model, peft_config, *args, **kwargs)

    get_peft_model._peftlab_dispatch = True  # type: ignore[attr-defined]
    get_peft_model.__wrapped__ = original  # type: ignore[attr-defined]
    return get_peft_model


def _peft_available() -> bool:
    """trl's ``is_peft_available``, answered for peftlab: a PEFT library is here."""
    return True


def _uses(module: types.ModuleType, names: set[str]) -> set[str]:
    """Which of ``names`` the module's source mentions (without peft, trl never binds them)."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        return set()
    return {n for n in names if n in source}


def bindings_for(module: types.ModuleType) -> dict[str, Any]:
    """For one ``trl.*`` module: name -> widened value, for each peft name it uses."""
    used = _uses(module, {*_CLASSES, "get_peft_model", "is_peft_available", "peft.__version__"})
    if "peft.__version__" in used:
        used.add("peft")
    if not used & {*_CLASSES, "get_peft_model"}:
        return {}
    found: dict[str, Any] = {}
    for name in used & set(_CLASSES):
        current = module.__dict__.get(name)
        if is_widened(current):
            continue
        peft_module, peft_name, ours = _CLASSES[name]
        theirs = _peft_class(peft_module, peft_name)
        found[name] = either(name, *([theirs] if theirs is not None else []), _peftlab_class(ours))
    if "get_peft_model" in used and not is_widened(module.__dict__.get("get_peft_model")):
        found["get_peft_model"] = dispatching_get_peft_model(module.__dict__.get("get_peft_model"))
    if importlib.util.find_spec("peft") is None:  # without peft, trl would refuse or never bind these names
        if "is_peft_available" in module.__dict__:
            found["is_peft_available"] = _peft_available
        if "peft" in used and "peft" not in module.__dict__:
            found["peft"] = types.SimpleNamespace(__version__=PEFT_API_VERSION, __name__="peft")
    return found

"""Method names -> configs, through the registry, so a newly registered method works here unchanged.

``full`` means full fine-tuning (no adapter). Any other name is matched against
``peftlab.registry.registered_methods()`` ignoring case and ``-``/``_`` (``lora``, ``ia3``,
``prompt-tuning``...). A run's ``options`` become the config's fields.

Methods that need per-step work in the Trainer (AdaLoRA's rank budget) name their callback
here or through a ``trainer_callbacks`` class attribute on their config ("module:Class"
strings). Callbacks are imported lazily and skipped with a warning when missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from typing import Any

from peftlab.config import PeftConfig, TaskType
from peftlab.errors import PeftConfigError, WorkbenchError
from peftlab.registry import config_class_for, registered_methods

FULL = "full"
# Full fine-tuning is no registered method, so its default sweep grid lives here (BERT-style
# models fine-tune at 1e-5 .. 1e-4; the adapter methods' grids are in their MethodSpec).
FULL_LEARNING_RATES = (1e-5, 3e-5, 1e-4)

# peft_type -> callbacks the method needs during training; extendable through the config class.
TRAINER_CALLBACKS: dict[str, tuple[str, ...]] = {
    "ADALORA": ("peftlab.adalora_callback:AdaLoraCallback",),
}


# peft_type -> options a method cannot do without, filled in when a run leaves them out (the
# library keeps them required, like peft; on the command line a working default is friendlier).
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "PROMPT_TUNING": {"num_virtual_tokens": 20},
    "P_TUNING": {"num_virtual_tokens": 20},
    "PREFIX_TUNING": {"num_virtual_tokens": 20},
    "SELECTIVE": {"bitfit": True},
}
# Options that depend on the run's length (AdaLoRA's rank schedule): filled from the optimizer
# step count the runner computes; validation before the data is loaded uses a placeholder.
STEP_COUNT_OPTIONS = ("total_step",)
PLACEHOLDER_STEPS = 1_000_000


def _key(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


def available_methods() -> list[str]:
    """Names accepted by ``method:`` (lower case), ``full`` first."""
    return [FULL, *(m.lower() for m in registered_methods())]


def resolve_method(name: str) -> str | None:
    """The registry key for ``name`` (None for full fine-tuning); unknown names are an error."""
    if _key(name) == FULL:
        return None
    for key in registered_methods():
        if _key(key) == _key(name):
            return key
    raise WorkbenchError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}.")


def config_fields(config_cls: type[PeftConfig]) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(config_cls) if f.init)


def build_config(
    method: str, options: dict[str, Any], task_type: TaskType = TaskType.SEQ_CLS, total_steps: int | None = None
) -> PeftConfig | None:
    """The method's config from a run's options (None for full fine-tuning).

    Unknown option names and values the config rejects are reported with the valid fields.
    ``total_steps`` (the run's optimizer steps) fills step-count options the run leaves out.
    """
    key = resolve_method(method)
    if key is None:
        if options:
            raise WorkbenchError(f"method 'full' takes no options, got {sorted(options)}; remove them.")
        return None
    config_cls = config_class_for(key)
    valid = config_fields(config_cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise WorkbenchError(f"{method}: unknown options {unknown}; {config_cls.__name__} fields are: {', '.join(valid)}.")
    values = {**RUN_DEFAULTS.get(key, {}), **options}
    for name in STEP_COUNT_OPTIONS:
        if name in valid and values.get(name) is None:
            values[name] = total_steps if total_steps is not None else PLACEHOLDER_STEPS
    if "task_type" in valid and values.get("task_type") is None:
        values["task_type"] = task_type.value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # from_dict warns about unknown keys; we checked them
            return config_cls.from_dict(values)
    except (PeftConfigError, TypeError, ValueError) as exc:
        raise WorkbenchError(f"{method}: {exc}") from None


def trainer_callbacks(config: PeftConfig | None, model: Any) -> list[Any]:
    """Instances of the Trainer callbacks ``config``'s method declares (missing ones skipped)."""
    if config is None:
        return []
    names = list(TRAINER_CALLBACKS.get(config.peft_type.value, ()))
    names += [n for n in getattr(type(config), "trainer_callbacks", ()) if n not in names]
    out = []
    for name in names:
        module_name, _, attr = name.partition(":")
        try:
            callback_cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            warnings.warn(f"{config.peft_type.value}: Trainer callback {name} is not available; training without it.", stacklevel=2)
            continue
        params = inspect.signature(callback_cls).parameters
        out.append(callback_cls(model=model) if "model" in params else callback_cls())
    return out

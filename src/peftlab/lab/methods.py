"""Method names -> configs, through the registry, so a newly registered method works here unchanged.

``full`` means full fine-tuning (no adapter). Any other name is matched against
``peftlab.registry.registered_methods()`` ignoring case and ``-``/``_`` (``lora``, ``ia3``,
``prompt-tuning``...). A run's ``options`` become the config's fields.

Everything method-specific the workbench uses comes from the method's
:class:`~peftlab.registry.MethodSpec`: run defaults for options the library keeps required,
options filled from the run's step count (AdaLoRA's ``total_step``), and Trainer callbacks
("module:Class" strings, imported lazily and skipped with a warning when missing).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from typing import Any

from peftlab.config import PeftConfig, TaskType
from peftlab.errors import PeftConfigError, WorkbenchError
from peftlab.registry import config_class_for, method_for, registered_methods

FULL = "full"
# Full fine-tuning is no registered method, so its default sweep grid lives here (BERT-style
# models fine-tune at 1e-5 .. 1e-4; the adapter methods' grids are in their MethodSpec).
FULL_LEARNING_RATES = (1e-5, 3e-5, 1e-4)

# Step-count options (MethodSpec.step_count_options) get this until the runner knows the real
# optimizer step count: validation before the data is loaded still builds the config.
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
    spec = method_for(key)
    values = {**spec.run_defaults, **options}
    for name in spec.step_count_options:
        if values.get(name) is None:
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
    out = []
    for name in method_for(config.peft_type).trainer_callbacks:
        module_name, _, attr = name.partition(":")
        try:
            callback_cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            warnings.warn(f"{config.peft_type.value}: Trainer callback {name} is not available; training without it.", stacklevel=2)
            continue
        params = inspect.signature(callback_cls).parameters
        out.append(callback_cls(model=model) if "model" in params else callback_cls())
    return out


def waits_for_step_count(config: PeftConfig | None) -> bool:
    """True while ``config`` holds the placeholder in an option its method fills from the step count."""
    if config is None:
        return False
    return any(getattr(config, name) == PLACEHOLDER_STEPS for name in method_for(config.peft_type).step_count_options)

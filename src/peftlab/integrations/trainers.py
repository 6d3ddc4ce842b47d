"""Make transformers' Trainer, accelerate and trl treat a peftlab ``PeftModel`` as peft's.

Those libraries decide "is this a PEFT model?" with a handful of predicates that test for
peft's own classes (``transformers.trainer_utils._is_peft_model``,
``accelerate.utils.is_peft_model``), and ``Trainer._save`` saves only classes it knows
(``PreTrainedModel`` or peft's ``PeftModel``). Everything downstream of those decisions -- adapter
checkpoints, resume (``model.load_adapter(...)``), ``load_best_model_at_end``, the QLoRA check
that refuses a "purely quantized" model, trl's fused LM head placed on ``get_base_model()`` --
then works through peftlab's peft-compatible API. trl's trainers also test ``peft_config`` and
adapted layers against peft's classes: :mod:`peftlab.integrations.trl_names` widens those.

:func:`enable_trainer_support` widens the predicates (the originals still answer for peft's
models), teaches ``Trainer._save`` to write an adapter folder for a peftlab model, and keeps doing
so for ecosystem modules imported later (:mod:`peftlab.integrations.import_hook`), so import order
does not matter. Creating a ``PeftModel`` turns it on by itself (:func:`enable_when_used`): when
transformers' Trainer or trl is imported already, at once; otherwise when one of them is. It is
never a side effect of ``import peftlab``. :func:`disable_trainer_support` restores every original
object and keeps it off.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from peftlab.integrations import trl_names
from peftlab.integrations.import_hook import AfterImport

# (module, attribute) of each predicate the ecosystem uses to recognise a peft model. Modules that
# imported one of them by name (``from accelerate.utils import is_peft_model``) are rebound too.
_PREDICATES: tuple[tuple[str, str], ...] = (
    ("transformers.trainer_utils", "_is_peft_model"),
    ("accelerate.utils.modeling", "is_peft_model"),
    ("accelerate.utils", "is_peft_model"),
)
_ECOSYSTEM_PREFIXES = ("transformers.", "accelerate.", "trl.")
# Importing one of these means a Trainer may see a peftlab model: trainer support turns on then.
_TRAINER_MODULES = ("transformers.trainer", "trl")

# What enable_trainer_support() replaced: (object, attribute name, original value).
_replaced: list[tuple[Any, str, Any]] = []
# original predicate's id -> its widened version, while enabled
_widened_predicates: dict[int, Callable[..., bool]] = {}
_state = {"user_disabled": False, "watching": False}


def is_peftlab_model(model: Any) -> bool:
    """True for a peftlab ``PeftModel``, also inside DDP / FSDP / ``torch.compile`` wrappers."""
    peft_model = sys.modules.get("peftlab.peft_model")
    if peft_model is None:  # no PeftModel can exist before its module is loaded
        return False
    seen = 0
    while not isinstance(model, peft_model.PeftModel) and seen < 8:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return False
        model, seen = inner, seen + 1
    return isinstance(model, peft_model.PeftModel)


def trainer_support_enabled() -> bool:
    """Whether :func:`enable_trainer_support` is in effect."""
    return bool(_replaced)


def enable_trainer_support() -> None:
    """Let ``transformers.Trainer`` (and subclasses such as trl's ``SFTTrainer``) train peftlab models as peft's.

    After this call, for a peftlab ``PeftModel``: checkpoints and ``save_model`` hold the adapter
    folder only (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by peft);
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` reload the adapter; a 4-/8-bit base
    loaded by transformers trains through its adapters (the QLoRA recipe); trl places its fused LM
    head on the transformers model inside, accepts ``peft_config=peftlab.LoraConfig(...)`` (with
    or without peft installed) and refuses an adapter on ``lm_head`` as it does peft's. Models
    that are not peftlab's are handled exactly as before. Idempotent, whatever was imported
    before; undo with :func:`disable_trainer_support`. Creating a ``PeftModel`` calls it when a
    Trainer is about (:func:`enable_when_used`).
    """
    _state["user_disabled"] = False
    if _replaced:
        return
    import transformers.trainer  # noqa: F401  (binds the predicates we rebind below)

    for module_name, attr in _PREDICATES:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if original is not None and id(original) not in _widened_predicates:
            _widened_predicates[id(original)] = _widened(original)
    _wrap_trainer_save()
    # Rebind everywhere the ecosystem holds a reference, including modules that imported a name
    # before this call (transformers.trainer, trl's trainers) and those imported after it.
    for name, module in list(sys.modules.items()):
        # (a module still running its own code is patched by the hook once it has finished)
        if module is not None and _WATCHER.wanted(name) and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _patch_module(module)
    _WATCHER.install()


def disable_trainer_support() -> None:
    """Put back every object :func:`enable_trainer_support` replaced; creating a model no longer turns it on."""
    _state["user_disabled"] = True
    _WATCHER.uninstall()
    _state["watching"] = False
    while _replaced:
        owner, attr, original = _replaced.pop()
        if original is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _widened_predicates.clear()


def enable_when_used() -> None:
    """Called when a ``PeftModel`` is created: trainer support on now if a Trainer is about, else once one is imported.

    Does nothing after :func:`disable_trainer_support` (the user's choice stands).
    """
    if _replaced or _state["user_disabled"]:
        return
    if any(name in sys.modules for name in _TRAINER_MODULES):
        enable_trainer_support()
        return
    _state["watching"] = True
    _WATCHER.install()


def _replace(owner: Any, attr: str, value: Any) -> None:
    _replaced.append((owner, attr, owner.__dict__.get(attr)))
    setattr(owner, attr, value)


def _patch_module(module: ModuleType) -> None:
    """Widen the predicates (and, in trl, peft's names) that ``module`` holds."""
    for attr in ("_is_peft_model", "is_peft_model"):
        value = module.__dict__.get(attr)
        if value is not None and id(value) in _widened_predicates:
            _replace(module, attr, _widened_predicates[id(value)])
    if module.__name__.startswith("trl."):
        for attr, value in trl_names.bindings_for(module).items():
            _replace(module, attr, value)


def _after_import(module: ModuleType) -> None:
    """The import hook's callback: patch a newly imported ecosystem module, or turn support on."""
    if _replaced:
        _patch_module(module)
    elif _state["watching"] and not _state["user_disabled"] and module.__name__ in _TRAINER_MODULES:
        enable_trainer_support()


_WATCHER = AfterImport(_ECOSYSTEM_PREFIXES, _after_import)


def _widened(original: Callable[..., bool]) -> Callable[..., bool]:
    def is_peft_model(model: Any) -> bool:
        return bool(original(model)) or is_peftlab_model(model)

    is_peft_model.__doc__ = f"{original.__module__}.{original.__name__}, also true for peftlab models."
    is_peft_model.__wrapped__ = original  # type: ignore[attr-defined]
    return is_peft_model


def _wrap_trainer_save() -> None:
    from transformers import Trainer

    original = Trainer._save

    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_peftlab_model(model):
            return original(self, output_dir, state_dict)
        save_adapter_checkpoint(self, model, output_dir if output_dir is not None else self.args.output_dir)

    _save.__doc__ = "Trainer._save; for a peftlab model writes the adapter folder instead of full weights."
    _save.__wrapped__ = original  # type: ignore[attr-defined]
    _replaced.append((Trainer, "_save", original))
    Trainer._save = _save


def save_adapter_checkpoint(trainer: Any, model: Any, output_dir: str) -> None:
    """What ``Trainer._save`` writes for a peft model: adapter folder, tokenizer, training args."""
    import torch
    from transformers.trainer import TRAINING_ARGS_NAME

    if not trainer.args.should_save:  # non-main ranks of a distributed run write nothing
        return
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor = trainer.processing_class
    if processor is None:
        processor = getattr(trainer.data_collator, "tokenizer", None)
    if processor is not None:
        processor.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

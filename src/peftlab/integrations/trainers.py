"""Make transformers' Trainer, accelerate and trl treat a peftlab ``PeftModel`` as peft's.

Those libraries decide "is this a PEFT model?" with a handful of predicates that test for
peft's own classes (``transformers.trainer_utils._is_peft_model``,
``accelerate.utils.is_peft_model``), and ``Trainer._save`` saves only classes it knows
(``PreTrainedModel`` or peft's ``PeftModel``). Everything downstream of those decisions -- adapter
checkpoints, resume (``model.load_adapter(...)``), ``load_best_model_at_end``, the QLoRA check
that refuses a "purely quantized" model, trl's fused LM head placed on ``get_base_model()`` --
then works through peftlab's peft-compatible API.

:func:`enable_trainer_support` widens those predicates (the originals still answer for peft's
models) and teaches ``Trainer._save`` to write an adapter folder for a peftlab model. It is an
explicit call, never a side effect of ``import peftlab``; calling it twice changes nothing, and
:func:`disable_trainer_support` restores every original object.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

# (module, attribute) of each predicate the ecosystem uses to recognise a peft model. Modules that
# imported one of them by name (``from accelerate.utils import is_peft_model``) are rebound too.
_PREDICATES: tuple[tuple[str, str], ...] = (
    ("transformers.trainer_utils", "_is_peft_model"),
    ("accelerate.utils.modeling", "is_peft_model"),
    ("accelerate.utils", "is_peft_model"),
)
_ECOSYSTEM_PREFIXES = ("transformers.", "accelerate.", "trl.")

# What enable_trainer_support() replaced: (object, attribute name, original value).
_replaced: list[tuple[Any, str, Any]] = []


def is_peftlab_model(model: Any) -> bool:
    """True for a peftlab ``PeftModel``, also inside DDP / FSDP / ``torch.compile`` wrappers."""
    from peftlab.peft_model import PeftModel

    seen = 0
    while not isinstance(model, PeftModel) and seen < 8:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return False
        model, seen = inner, seen + 1
    return isinstance(model, PeftModel)


def trainer_support_enabled() -> bool:
    """Whether :func:`enable_trainer_support` is in effect."""
    return bool(_replaced)


def enable_trainer_support() -> None:
    """Let ``transformers.Trainer`` (and subclasses such as trl's ``SFTTrainer``) train peftlab models as peft's.

    After this call, for a peftlab ``PeftModel``: checkpoints and ``save_model`` hold the adapter
    folder only (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by peft);
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` reload the adapter; a 4-/8-bit base
    loaded by transformers trains through its adapters (the QLoRA recipe); trl places its fused LM
    head on the transformers model inside. Models that are not peftlab's are handled exactly as
    before. Idempotent; undo with :func:`disable_trainer_support`.
    """
    if _replaced:
        return
    import transformers.trainer  # noqa: F401  (binds the predicates we rebind below)

    originals: dict[int, Callable[..., bool]] = {}
    for module_name, attr in _PREDICATES:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if original is None:
            continue
        if id(original) not in originals:
            originals[id(original)] = _widened(original)
    # Rebind the predicate everywhere the ecosystem holds a reference to it, including modules that
    # imported it by name before this call (e.g. transformers.trainer, trl's trainers).
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith(_ECOSYSTEM_PREFIXES) or name in ("transformers", "accelerate", "trl")):
            continue
        for attr in ("_is_peft_model", "is_peft_model"):
            value = module.__dict__.get(attr)
            if value is not None and id(value) in originals:
                _replaced.append((module, attr, value))
                setattr(module, attr, originals[id(value)])
    _wrap_trainer_save()
    _teach_trl_adapted_layers()


def _teach_trl_adapted_layers() -> None:
    """Let trl's "adapter on lm_head" check see peftlab's adapted layers too.

    trl's SFTTrainer computes log-probabilities from ``lm_head.weight`` directly, so it refuses a
    PEFT model whose output embedding is an adapter layer (peft's ``BaseTunerLayer``); without
    this, a peftlab adapter on ``lm_head`` would be silently left untrained. Without peft
    installed, trl never defines that name, and the check would raise ``NameError``.
    """
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return
    from peftlab.layers import LayerWrapper

    importlib.import_module("trl.trainer.sft_trainer")
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("trl."):
            continue
        current = module.__dict__.get("BaseTunerLayer", None)
        if current is None and name != "trl.trainer.sft_trainer":
            continue
        _replaced.append((module, "BaseTunerLayer", current))
        module.BaseTunerLayer = LayerWrapper if current is None else (current, LayerWrapper)


def disable_trainer_support() -> None:
    """Put back every object :func:`enable_trainer_support` replaced."""
    while _replaced:
        owner, attr, original = _replaced.pop()
        if original is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


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

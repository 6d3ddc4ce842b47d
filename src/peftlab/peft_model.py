"""PeftModel: the user-facing wrapper around a model with adapters.

It owns the adapter configs and the active adapter's name, checks requests, and hands the
model-side work to its tuner (:mod:`peftlab.tuners`): layer surgery, prompt learning or
selective tuning. The module tree is peft's: for layer and selective methods ``base_model`` is
the tuner and ``base_model.model`` the user's model; for prompt methods ``base_model`` is the
user's model, beside ``prompt_encoder.<adapter>`` and ``word_embeddings``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftlab import checkpoint, quantization, targeting
from peftlab.config import CLASSIFIER_HEAD_NAMES, PeftConfig
from peftlab.errors import AdapterStateError, PeftConfigError, QuantizationError
from peftlab.layers import BASE_ROW
from peftlab.registry import method_for
from peftlab.tuners import PromptTuner, Tuner, tuner_for
from peftlab.tuners.base import has_module
from peftlab.tuners.layer import known_rows, merge_and_unload_quantized


class PeftModel(nn.Module):
    """A model whose chosen layers carry adapters.

    Build one with :func:`peftlab.get_peft_model` or :meth:`PeftModel.from_pretrained`.
    Attribute access falls through to the wrapped model (``config``, ``generate``, ...).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str = adapter_name
        if not isinstance(peft_config, PeftConfig):
            raise PeftConfigError(f"expected a peftlab config (e.g. LoraConfig), got {type(peft_config).__name__}.")
        tuner = tuner_for(model, method_for(peft_config.peft_type))
        self.__dict__["_tuner"] = tuner  # also registered below, under peft's names
        if isinstance(tuner, PromptTuner):
            self.base_model = model
            self.prompt_encoder = tuner.prompt_encoder
        else:
            self.base_model = tuner
        self._add_adapter(adapter_name, peft_config)
        if isinstance(tuner, PromptTuner):
            # peft registers the input embeddings here too (state_dict key ``word_embeddings.weight``).
            self.word_embeddings = model.get_input_embeddings()
        self._expose_base_signature()

    @property
    def tuner(self) -> Tuner:
        """The model-side half: adapters in layers, virtual tokens, or swapped tensor values."""
        return self.__dict__["_tuner"]

    # ----- construction -----------------------------------------------------------------------
    def _resolved(self, config: PeftConfig) -> PeftConfig:
        """A copy of ``config`` with model-dependent defaults filled in."""
        model = self.get_base_model()
        spec = method_for(config.peft_type)
        if not spec.supports_quantized and quantization.is_quantized_model(model):
            raise QuantizationError(
                f"{type(config).__name__}: this method does not work on a 4-/8-bit quantized base; "
                f"load the model in full precision or use a method that does (e.g. LoRA)."
            )
        config = copy.deepcopy(config)
        if getattr(config, "target_modules", "") is None and spec.default_targets_for is not None:
            config.target_modules = spec.default_targets_for(config, model)
        elif getattr(config, "target_modules", "") is None:
            config.target_modules = targeting.default_target_modules(model, spec.default_targets, type(config).__name__)
        if spec.resolve_config is not None:
            config = spec.resolve_config(config, model)
        heads = [h for h in CLASSIFIER_HEAD_NAMES.get(config.task_type, ()) if has_module(model, h)]
        if heads:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return config

    def _check_new(self, adapter_name: str, config: PeftConfig) -> None:
        if not isinstance(config, PeftConfig):
            raise PeftConfigError(f"expected a peftlab config (e.g. LoraConfig), got {type(config).__name__}.")
        if not adapter_name or "." in adapter_name or adapter_name == BASE_ROW:
            raise AdapterStateError(f"invalid adapter name {adapter_name!r}: use a non-empty name without dots, not {BASE_ROW!r}.")
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"an adapter named {adapter_name!r} exists already; pick another name or delete it first.")
        if any(not isinstance(c, type(config)) and not isinstance(config, type(c)) for c in self.peft_config.values()):
            raise AdapterStateError(
                f"this model holds {type(next(iter(self.peft_config.values()))).__name__} adapters; "
                f"adapters of different methods cannot share one PeftModel."
            )

    def _add_adapter(self, adapter_name: str, config: PeftConfig, weights: Any = None) -> None:
        """Add an adapter (and load ``weights`` into it); on any error the model is as before.

        This is the one rollback path: the tuner removes whatever part of the adapter was built
        and every parameter gets back its ``requires_grad``.
        """
        self._check_new(adapter_name, config)
        flags = {p: p.requires_grad for p in self.get_base_model().parameters()}
        try:
            resolved = self._resolved(config)
            self.tuner.add(adapter_name, resolved, self.active_adapter)
            self.peft_config[adapter_name] = resolved
            if weights is not None:
                set_peft_model_state_dict(self, weights, adapter_name)
            self._mark_trainable()
        except BaseException:
            self._rollback(adapter_name, flags)
            raise

    def _rollback(self, adapter_name: str, flags: dict[nn.Parameter, bool]) -> None:
        """Remove every part of ``adapter_name`` that exists and restore ``requires_grad`` flags."""
        self.tuner.remove(adapter_name)
        self.peft_config.pop(adapter_name, None)
        if self.peft_config and self.active_adapter not in self.peft_config:
            self.active_adapter = next(iter(self.peft_config))
        for param, flag in flags.items():
            param.requires_grad_(flag)

    def _expose_base_signature(self) -> None:
        """Make ``inspect.signature(self.forward)`` show the base model's arguments.

        The HF Trainer drops dataset columns that the model's forward does not name; with a
        bare ``*args, **kwargs`` signature it would drop them all.
        """
        base_forward = getattr(type(self.get_base_model()), "forward", None)
        if base_forward is None:
            return

        def forward(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
            return PeftModel.forward(self, *args, **kwargs)

        functools.update_wrapper(forward, base_forward)
        self.forward = types.MethodType(forward, self)

    # ----- trainable parameters -------------------------------------------------------------
    def _mark_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter (unless loaded for inference)."""
        self.tuner.mark_trainable(self.active_adapter, self.peft_config[self.active_adapter])

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit packed weights count as two values per byte."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            if param.__class__.__name__ == "Params4bit":
                n *= 2
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ----- forward / generate -----------------------------------------------------------------
    def forward(self, *args: Any, labels: Any = None, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters."""
        if labels is not None:
            kwargs["labels"] = labels
        if adapter_names is not None:
            known_rows(adapter_names, list(self.peft_config))
        return self.tuner(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            known_rows(adapter_names, list(self.peft_config))
        return self.tuner.generate(*args, adapter_names=adapter_names, **kwargs)

    # ----- adapter management -----------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add another adapter (not active until :meth:`set_adapter`)."""
        self._add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one used in forward and trained."""
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {sorted(self.peft_config)}.")
        self.tuner.activate(adapter_name)
        self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {sorted(self.peft_config)}.")
        if len(self.peft_config) == 1:
            raise AdapterStateError("cannot delete the only adapter; use unload() to get the base model back.")
        self.tuner.remove(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves as the base model."""
        with self.tuner.disabled():
            yield

    # ----- merging ----------------------------------------------------------------------------
    def _check_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterStateError(f"unknown adapters {unknown}; known: {sorted(self.peft_config)}.")
        return names

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (undo with :meth:`unmerge_adapter`)."""
        names = self._check_names(adapter_names)
        self.tuner.merge(names, self.peft_config, safe_merge)

    def unmerge_adapter(self) -> None:
        self.tuner.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, requantize: bool = False
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        A 4-/8-bit base comes back dequantized (fp32, exact merge) unless ``requantize=True``
        (lossy; see :func:`peftlab.tuners.layer.merge_and_unload_quantized`).
        """
        names = self._check_names(adapter_names)
        if quantization.is_quantized_model(self.get_base_model()):
            return merge_and_unload_quantized(self, names, safe_merge, requantize)
        return self.tuner.unload(merge=True, names=names, configs=self.peft_config, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Return the base model without adapters and with its original weights."""
        self.unmerge_adapter()
        return self.tuner.unload(merge=False, names=[], configs=self.peft_config)

    def get_base_model(self) -> nn.Module:
        """The user's model (``base_model.model`` in peft's tree; ``base_model`` for prompt methods)."""
        return self.tuner.model

    # ----- save / load ------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None, **_: Any
    ) -> None:
        """Write each adapter as peft does: "default" in the folder, others in sub-folders."""
        if os.path.isfile(save_directory):
            raise AdapterStateError(f"{save_directory} is a file; save_pretrained needs a folder path.")
        names = self._check_names(selected_adapters if selected_adapters is not None else list(self.peft_config))
        for name in names:
            folder = os.path.join(os.fspath(save_directory), name) if name != "default" else os.fspath(save_directory)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            checkpoint.save_adapter_weights(folder, get_peft_model_state_dict(self, adapter_name=name))
            config.save_pretrained(folder)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        allow_pickle: bool = False,
    ) -> "PeftModel":
        """Wrap ``model`` and load a saved adapter; the model is left untouched on any error."""
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config.inference_mode = not is_trainable
        weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        flags = {p: p.requires_grad for p in model.parameters()}
        peft_model = cls(model, config, adapter_name)  # undoes itself if it fails
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name)
        except BaseException:
            peft_model._rollback(adapter_name, flags)
            raise
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Load a saved adapter next to the existing ones under ``adapter_name``."""
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config.inference_mode = not is_trainable
        weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        self._add_adapter(adapter_name, config, weights)

    # ----- attribute fall-through ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def get_peft_model_state_dict(model: PeftModel, state_dict: Any = None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return checkpoint.get_peft_model_state_dict(model, state_dict, adapter_name)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: Any, adapter_name: str = "default") -> None:
    checkpoint.set_peft_model_state_dict(model, peft_model_state_dict, adapter_name)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new adapter built from ``peft_config``; the base weights are frozen.

    On any error ``model`` is left as it was (PeftModel undoes a failed adapter itself).
    """
    return PeftModel(model, peft_config, adapter_name)

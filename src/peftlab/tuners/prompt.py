"""Prompt learning: virtual tokens that rewrite the model's inputs (prompt, prefix, p-tuning).

peft keeps the bare model as ``PeftModel.base_model`` for these methods, the virtual-token
modules as ``prompt_encoder.<adapter>`` and the model's input embeddings as
``word_embeddings``; PeftModel registers :attr:`PromptTuner.prompt_encoder` and the embeddings
under those names, so this tuner is kept beside the tree, not in it. Heads the task trains
(modules_to_save) are wrapped inside the model as for layer methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftlab import surgery
from peftlab.errors import AdapterStateError
from peftlab.tuners.base import Tuner, check_modules_to_save, follow_active, wrappers_disabled

if TYPE_CHECKING:
    from peftlab.config import PeftConfig
    from peftlab.registry import MethodSpec


class PromptTuner(Tuner):
    """One virtual-token module per adapter; forward and generate get rewritten inputs."""

    key_prefix: ClassVar[str] = "base_model."  # peft saves prompt methods' heads under the bare model

    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model)
        self.prompt_encoder = nn.ModuleDict()
        self.__dict__["_spec"] = spec
        self.__dict__["_active"] = None
        self.__dict__["_off"] = False

    def add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        check_modules_to_save(self.model, config)
        encoder = self.__dict__["_spec"].make_model_adapter(self.model, config)
        self.prompt_encoder[adapter_name] = encoder
        if config.modules_to_save:
            surgery.wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.activate(active)

    def remove(self, adapter_name: str) -> None:
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        surgery.remove_adapter(self.model, adapter_name)

    def activate(self, adapter_name: str) -> None:
        self.__dict__["_active"] = adapter_name
        follow_active(self.model, adapter_name)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self.__dict__["_off"] = True
        try:
            with wrappers_disabled(self.model):
                yield
        finally:
            self.__dict__["_off"] = False

    def merge(self, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool) -> None:
        raise AdapterStateError(
            f"adapters {list(names)} use {type(configs[names[0]]).__name__}, a prompt method: its virtual "
            f"tokens are extra inputs, not a weight update, so they cannot be merged. Keep the PeftModel for inference."
        )

    def unload(self, merge: bool, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool = False) -> nn.Module:
        if merge:
            self.merge(names, configs, safe_merge)
        for name in list(self.prompt_encoder):
            del self.prompt_encoder[name]
        return surgery.unload(self.model, merge=False)

    # ----- tensors ------------------------------------------------------------------------------
    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.prompt_encoder[adapter_name].saved_tensors()

    def load_extra_saved(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prompt_encoder[adapter_name].load_saved(tensors)

    def trainable_tensors(self, adapter_name: str, config: "PeftConfig") -> list[torch.Tensor]:
        heads = list(self.adapter_tensors(adapter_name, config).values())
        return [*self.prompt_encoder[adapter_name].parameters(), *heads]

    # ----- forward ------------------------------------------------------------------------------
    def _prompt(self, adapter_names: Sequence[str] | None) -> nn.Module | None:
        """The active virtual-token module, or None inside disable_adapter()."""
        active = self.__dict__["_active"]
        if self.__dict__["_off"] or active not in self.prompt_encoder:
            return None
        if adapter_names is not None:
            raise AdapterStateError("mixed-batch adapter_names is not supported for prompt methods; run one adapter per batch.")
        return self.prompt_encoder[active]

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        prompt = self._prompt(adapter_names)
        if prompt is None:
            return self.model(*args, **kwargs)
        return self.model(**prompt.forward_kwargs(self.model, _named_inputs(self.model, args, kwargs)))

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        prompt = self._prompt(adapter_names)
        if prompt is None:
            return self.model.generate(*args, **kwargs)
        if len(args) > 1:
            raise AdapterStateError("generate() takes one positional input (input_ids); pass the rest by name.")
        named = {"input_ids": args[0], **kwargs} if args else dict(kwargs)
        return self.model.generate(**prompt.generate_kwargs(self.model, named))


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional inputs given names from the model's forward signature (prompts rewrite them by name)."""
    if not args:
        return dict(kwargs)
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise AdapterStateError(f"{len(args)} positional inputs but {type(model).__name__}.forward names only {len(params)}; pass them by name.")
    return {**dict(zip((p.name for p in params), args)), **kwargs}

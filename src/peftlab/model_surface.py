"""The rest of peft's ``PeftModel`` surface: attributes and small methods user code and trl read.

Kept apart from :mod:`peftlab.peft_model` (construction, adapters, forward, save/load) because
none of it changes the model's state beyond ``requires_grad`` flags: each answer is read off the
configs, the tuner or the base model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.errors import AdapterStateError

if TYPE_CHECKING:
    from peftlab.config import PeftConfig, PeftType


class PeftModelSurface:
    """Mixed into :class:`peftlab.peft_model.PeftModel` (which provides every attribute used here)."""

    #: Arguments PeftModel.forward takes beyond the base model's (peft's name for the set).
    special_peft_forward_args = frozenset({"adapter_names"})

    @property
    def peft_type(self) -> "PeftType":
        return self.active_peft_config.peft_type

    @property
    def active_peft_config(self) -> "PeftConfig":
        return self.peft_config[self.active_adapter]  # type: ignore[attr-defined]

    @property
    def modules_to_save(self) -> set[str] | None:
        """Names trained in full and saved by any adapter (peft keeps the union), None when there are none."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}  # type: ignore[attr-defined]
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)  # type: ignore[attr-defined]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when some adapter changes the forward now (not disabled, not all merged away)."""
        from peftlab.layers import iter_wrappers

        if "_layers_off" in self.__dict__:
            return False
        wrappers = [w for _, w in iter_wrappers(self.get_base_model())]  # type: ignore[attr-defined]
        if not wrappers:
            return bool(self.active_adapters)  # type: ignore[attr-defined]
        return any(not w.disabled and any(n in getattr(w, "adapters", {}) or n in getattr(w, "modules_to_save", {})
                                          for n in w.active_adapters) for w in wrappers)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn training of ``adapter_names`` on or off without changing which adapters are active."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]  # type: ignore[attr-defined]
        if unknown:
            raise AdapterStateError(f"unknown adapters {unknown}; known: {sorted(self.peft_config)}.")  # type: ignore[attr-defined]
        for name in names:
            self.tuner.set_adapter_trainable(name, self.peft_config[name], requires_grad)  # type: ignore[attr-defined]

    def _prompt_module(self, adapter_name: str | None) -> Any:
        from peftlab.tuners import PromptTuner

        name = adapter_name or self.active_adapter  # type: ignore[attr-defined]
        if not isinstance(self.tuner, PromptTuner):  # type: ignore[attr-defined]
            raise AdapterStateError(f"{type(self.peft_config[name]).__name__} is not a prompt method: it has no prompt.")  # type: ignore[attr-defined]
        return self.tuner.prompt_encoder[name]  # type: ignore[attr-defined]

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The virtual-token rows of a prompt method's adapter, (num_virtual_tokens, width), detached."""
        return self._prompt_module(adapter_name).encode().detach()

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The active prompt adapter's virtual-token embeddings, repeated for ``batch_size`` rows.

        For prompt tuning and P-tuning this is what is put in front of the input embeddings. Prefix
        tuning's prompt is a key/value pair per layer that the forward builds; it is refused here.
        """
        prompt = self._prompt_module(None)
        if getattr(self.active_peft_config.peft_type, "value", "") == "PREFIX_TUNING":
            raise AdapterStateError("prefix tuning's prompt is per-layer keys/values built in forward; call the model "
                                    "(or get_prompt_embedding_to_save for its stored rows) instead.")
        if task_ids is not None:
            raise AdapterStateError("task_ids belong to multitask prompt tuning, which peftlab does not implement.")
        rows = prompt.encode()
        return rows.unsqueeze(0).expand(batch_size, *rows.shape)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write the adapter's model card (README.md) into ``output_dir`` unless one is there."""
        from peftlab import hub

        hub.write_model_card(output_dir, self.active_peft_config)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Let inputs carry gradients so checkpointed blocks of a frozen base still backpropagate (as peft)."""
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return model

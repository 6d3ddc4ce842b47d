"""peft's ``LoraModel`` surface on a tuner (``peft_model.base_model``), delegated to its PeftModel.

User code written for peft calls these on ``model.base_model`` (``model.base_model.set_adapter(
["a", "b"])``, ``model.base_model.peft_config``, ``merge_and_unload()``). In peftlab the PeftModel
owns configs and the active adapters and checks every request, so the tuner forwards each call to
the PeftModel that holds it (a weak reference: the tuner is the PeftModel's submodule, not the
other way round). A tuner without a PeftModel (never the case through the public API) says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftlab.config import PeftConfig
    from peftlab.peft_model import PeftModel

# The prefix peft gives each method's parameter names (``lora_A`` -> "lora_"), by peft type.
PARAMETER_PREFIX = {"LORA": "lora_", "ADALORA": "lora_", "IA3": "ia3_", "LOHA": "hada_", "LOKR": "lokr_",
                    "BOTTLENECK": "adapter_", "PROMPT_TUNING": "prompt_", "PREFIX_TUNING": "prefix_",
                    "P_TUNING": "prompt_", "SELECTIVE": "", "VERA": "vera_lambda_", "OFT": "oft_", "TRAINABLE_TOKENS": "trainable_tokens_"}


class PeftTunerSurface:
    """Mixed into :class:`peftlab.tuners.base.Tuner`; every method goes through the owning PeftModel."""

    def bind_owner(self, owner: "PeftModel") -> None:
        self.__dict__["_owner"] = weakref.ref(owner)

    @property
    def owner(self) -> "PeftModel":
        ref = self.__dict__.get("_owner")
        owner = ref() if ref is not None else None
        if owner is None:  # (AttributeError: hasattr() probes must get False, not an exception)
            raise AttributeError("this tuner belongs to no PeftModel; build models with get_peft_model().")
        return owner

    @property
    def peft_config(self) -> "dict[str, PeftConfig]":
        return self.owner.peft_config

    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names (peft's tuners answer with the list too)."""
        return self.owner.active_adapters

    @property
    def active_adapters(self) -> list[str]:
        return self.owner.active_adapters

    @property
    def prefix(self) -> str:
        return PARAMETER_PREFIX.get(self.owner.peft_type.value, "")

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in ``base_model.model``) of the layers that carry adapters."""
        from peftlab.layers import LayerWrapper

        return [name for name, module in self.model.named_modules() if isinstance(module, LayerWrapper)]  # type: ignore[attr-defined]

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` active; a list activates several (their updates add up, as in peft)."""
        self.owner.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.owner.delete_adapter(adapter_name)

    def enable_adapter_layers(self) -> None:
        self.owner.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.owner.disable_adapter_layers()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self.owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.owner.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> Any:
        return self.owner.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> Any:
        return self.owner.unload()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.owner.add_weighted_adapter(*args, **kwargs)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        self.owner.set_requires_grad(adapter_names, requires_grad)

    def get_model_config(self, model: Any = None) -> dict[str, Any]:
        """The base model's config as a dict (peft's static helper; ``{}`` for a model without one)."""
        config = getattr(model if model is not None else self.model, "config", None)  # type: ignore[attr-defined]
        return config.to_dict() if hasattr(config, "to_dict") else {}

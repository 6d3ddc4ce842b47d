"""peft's free functions: ``get_peft_config``, ``inject_adapter_in_model``, ``load_peft_weights``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from peftlab import checkpoint
from peftlab.config import PeftConfig
from peftlab.errors import PeftConfigError


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The method's config built from a dict holding ``peft_type`` (as in ``adapter_config.json``)."""
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False) -> nn.Module:
    """Put adapter layers into ``model`` in place and return it, without a PeftModel around it.

    As in peft, only the adapter's parameters stay trainable; saving, merging and switching
    adapters then need a :class:`~peftlab.PeftModel` (use :func:`peftlab.get_peft_model`).
    ``low_cpu_mem_usage`` is accepted for peft's signature: adapters are created directly on
    the base layer's device, so there is no meta-device stage to skip.
    """
    from peftlab.peft_model import get_peft_model

    if peft_config.is_prompt_learning:
        raise PeftConfigError(
            f"{type(peft_config).__name__} adds virtual tokens at the model's inputs, which needs the PeftModel "
            f"wrapper; use get_peft_model(model, config) instead of inject_adapter_in_model."
        )
    return get_peft_model(model, peft_config, adapter_name).get_base_model()


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None,
                      allow_pickle: bool = False, subfolder: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (``adapter_model.safetensors``), on ``device`` (default CPU)."""
    weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
    return {k: v.to(device) for k, v in weights.items()} if device is not None else weights

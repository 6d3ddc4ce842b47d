"""``get_layer_status`` / ``get_model_status``: what each adapted layer holds, as peft reports it.

Useful to check a model after loading several adapters: which are active, merged, trainable,
and on which devices. A value that differs between layers is reported as ``"irregular"``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.layers import LayerWrapper, ModulesToSave

if TYPE_CHECKING:
    from peftlab.peft_model import PeftModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


def _all_or_none(values: list) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_parameters(layer: nn.Module, names: list[str]) -> dict[str, list[nn.Parameter]]:
    """Each adapter's parameters in one layer, read from its name-keyed containers (peft's tree)."""
    out: dict[str, list[nn.Parameter]] = defaultdict(list)
    for attr, container in layer.named_children():
        if attr in ("base_layer", "original_module") or not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for name in names:
            if name in container:
                item = container[name]
                out[name].extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


def get_layer_status(model: "PeftModel") -> list[TunerLayerStatus]:
    """One status row per adapted layer and per fully trained module (``modules_to_save``)."""
    from peftlab.tuners import PromptTuner

    if isinstance(model.tuner, PromptTuner):
        raise AdapterStateError(
            f"{type(model.peft_config[model.active_adapter]).__name__} is a prompt method: its virtual tokens are not "
            f"adapter layers (peft refuses this too); inspect model.peft_config and model.prompt_encoder instead."
        )
    rows: list[TunerLayerStatus] = []
    for name, layer in model.tuner.named_modules():
        if not isinstance(layer, (LayerWrapper, ModulesToSave)):
            continue
        available = sorted(layer.adapters) if isinstance(layer, LayerWrapper) else sorted(layer.modules_to_save)
        params = _adapter_parameters(layer, available)
        if isinstance(layer, LayerWrapper):
            method = model.peft_config[available[0]].peft_type.value.lower() if available else "adapter"
            module_type = f"{method}.{type(layer.base_layer).__name__}"
            merged = list(layer.merged_adapters)
        else:
            module_type, merged = "ModulesToSaveWrapper", []
        rows.append(TunerLayerStatus(
            name=name,
            module_type=module_type,
            enabled=not layer.disabled,
            active_adapters=list(layer.active_adapters),
            merged_adapters=merged,
            requires_grad={k: _all_or_none([p.requires_grad for p in v]) for k, v in params.items()},
            available_adapters=available,
            devices={k: sorted({p.device.type for p in v}) for k, v in params.items()},
        ))
    if not rows:
        raise AdapterStateError(
            f"{type(model.peft_config[model.active_adapter]).__name__} adds no adapter layers (selective tuning works "
            f"on the model's own tensors); inspect model.peft_config and named_parameters() instead."
        )
    return rows


def get_model_status(model: "PeftModel") -> TunerModelStatus:
    """The layer statuses summed up for the whole model."""
    layers = get_layer_status(model)
    trainable, total = model.get_nb_trainable_parameters()
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_all = sorted({n for s in layers for n in s.merged_adapters})
    merged_irregular = any(set(merged_all) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    grads: dict[str, list] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].update(value)
    return TunerModelStatus(
        base_model_type=type(model.get_base_model()).__name__,
        adapter_model_type=type(model.tuner).__name__,
        peft_types={k: c.peft_type.value for k, c in model.peft_config.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if merged_irregular else merged_all,
        requires_grad={k: _all_or_none(v) for k, v in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
    )

"""peft's public names that are not one of peftlab's own classes under the same name.

* ``LoraModel``, ``IA3Model``, ``LoHaModel``, ``LoKrModel``, ``AdaLoraModel``: in peft, the class of
  ``peft_model.base_model``. Here the tuner is one class per *kind* of method, so each name is a
  class whose ``isinstance`` asks "a tuner holding this method's adapters?"
  (``isinstance(model.base_model, LoraModel)``), and calling it as peft users do
  (``LoraModel(model, config, "default")``) injects the adapter and returns the tuner.
* the lookup tables (``PEFT_TYPE_TO_CONFIG_MAPPING``, ...), ``PeftWarning``, and small functions
  from ``peft.utils`` that are exported at peft's top level.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from peftlab.errors import AdapterStateError


class _TunerNameMeta(type):
    """``isinstance(tuner, LoraModel)``: a tuner bound to a PeftModel whose adapters are one of ``peft_types``."""

    peft_types: tuple[str, ...]

    def __instancecheck__(cls, obj: Any) -> bool:
        from peftlab.tuners import Tuner

        if not isinstance(obj, Tuner):
            return False
        try:
            return obj.owner.peft_type.value in cls.peft_types
        except AttributeError:  # a tuner with no PeftModel
            return False

    def __call__(cls, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> Any:
        """As peft's ``LoraModel(model, config, adapter_name)``: adapters injected into ``model``, the tuner returned."""
        from peftlab.peft_model import get_peft_model

        configs = config if isinstance(config, Mapping) else {adapter_name: config}
        (first, first_config), *rest = configs.items()
        peft_model = get_peft_model(model, first_config, first, **kwargs)
        for name, extra in rest:
            peft_model.add_adapter(name, extra)
        tuner = peft_model.base_model
        tuner.__dict__["_kept_owner"] = peft_model  # the caller keeps only the tuner: keep its PeftModel alive
        return tuner


def _tuner_name(name: str, *peft_types: str) -> type:
    return _TunerNameMeta(name, (), {"peft_types": peft_types,
                                      "__doc__": f"peft's {name}: the tuner of a model with {' or '.join(peft_types)} adapters."})


# AdaLoRA's tuner is a LoraModel in peft (a subclass), so isinstance(adalora_tuner, LoraModel) holds there too.
LoraModel = _tuner_name("LoraModel", "LORA", "ADALORA")
AdaLoraModel = _tuner_name("AdaLoraModel", "ADALORA")
IA3Model = _tuner_name("IA3Model", "IA3")
LoHaModel = _tuner_name("LoHaModel", "LOHA")
LoKrModel = _tuner_name("LoKrModel", "LOKR")
VeraModel = _tuner_name("VeraModel", "VERA")
OFTModel = _tuner_name("OFTModel", "OFT")
TrainableTokensModel = _tuner_name("TrainableTokensModel", "TRAINABLE_TOKENS")

TUNER_NAMES = {"LORA": LoraModel, "ADALORA": AdaLoraModel, "IA3": IA3Model, "LOHA": LoHaModel, "LOKR": LoKrModel,
               "VERA": VeraModel, "OFT": OFTModel, "TRAINABLE_TOKENS": TrainableTokensModel}


class PeftWarning(UserWarning):
    """Category of the warnings peftlab gives where peft gives its ``PeftWarning``."""


class _LazyTable(Mapping[Any, Any]):
    """A read-only mapping built on first use (the registry imports every method family)."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self._table: dict[Any, Any] | None = None

    def _get(self) -> dict[Any, Any]:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key: Any) -> Any:
        table = self._get()
        return table[key] if key in table else table[str(getattr(key, "value", key))]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


def _config_table() -> dict[Any, Any]:
    from peftlab.config import PeftType
    from peftlab.registry import config_class_for

    return {t: config_class_for(t.value) for t in PeftType}


def _tuner_table() -> dict[Any, Any]:
    from peftlab.config import PeftType

    return {t: TUNER_NAMES[t.value] for t in PeftType if t.value in TUNER_NAMES}


def _task_table() -> dict[str, Any]:
    from peftlab.peft_model import TASK_MODEL_CLASSES

    return {task.value: cls for task, cls in TASK_MODEL_CLASSES.items()}


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[Any, Any] = _LazyTable(_config_table)
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[Any, Any] = _LazyTable(_tuner_table)
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: Mapping[Any, Any] = _LazyTable(_task_table)


class PeftMixedModel:
    """peft's model for adapters of *different* methods at once; peftlab has one method per model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AdapterStateError(
            "peftlab has no PeftMixedModel (adapters of different methods in one model); use one method per "
            "model, or several adapters of one method with add_adapter() and set_adapter([...])."
        )


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (fp16/bf16), trainable ones to fp32: what autocast training wants (as peft)."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for a seq2seq model: each row moved right by one, ``decoder_start_token_id`` first, -100 -> pad."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    if pad_token_id is None:
        raise ValueError("shift_tokens_right needs pad_token_id (labels may hold -100, which must become padding).")
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def _original_keys(model: Any) -> dict[str, str]:
    """Base-model key as the bare model names it -> key in the adapted model's state dict (adapters left out)."""
    from peftlab.layers import iter_wrappers

    base = model.get_base_model()
    adapter_params = {id(p) for _, w in iter_wrappers(base) for p in _adapter_parameters(w)}
    out: dict[str, str] = {}
    for key, value in base.state_dict(keep_vars=True).items():
        if id(value) in adapter_params:
            continue
        original = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        if original.startswith(("base_layer.", "original_module.")):
            original = original.split(".", 1)[1]
        out[original] = key
    return out


def _adapter_parameters(wrapper: nn.Module) -> Iterator[torch.Tensor]:
    from peftlab.layers import LayerWrapper

    if isinstance(wrapper, LayerWrapper):
        for name, module in wrapper.named_children():
            if name != "base_layer":
                yield from module.parameters()
    else:  # ModulesToSave: the trained copies
        yield from wrapper.modules_to_save.parameters()


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights under the names the bare model gives them (no adapters, no wrapper infixes)."""
    state = model.get_base_model().state_dict()
    return {original: state[key] for original, key in _original_keys(model).items()}


def set_base_model_state_dict(model: Any, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """Load weights named as in the bare model into the adapted model's base layers (the inverse of the above)."""
    keys = _original_keys(model)
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        raise RuntimeError(f"set_base_model_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")
    result = model.get_base_model().load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    from collections import namedtuple

    return namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])(missing, unexpected + list(result.unexpected_keys))

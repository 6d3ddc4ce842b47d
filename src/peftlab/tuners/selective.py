"""Selective tuning's tuner: the model's own tensors, with values swapped between adapters.

No module is replaced, so the tree is the model's own (``base_model.model.<parameter>``); the
values of inactive adapters and the base values live in the method's value store
(:class:`peftlab.methods.selective.SelectiveValues`, built by the registry's ``make_tuner``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftlab import surgery
from peftlab.errors import AdapterStateError
from peftlab.registry import MethodSpec
from peftlab.tuners.base import Tuner

if TYPE_CHECKING:
    from peftlab.config import PeftConfig


class SelectiveTuner(Tuner):
    """Adapters that are values of the model's own tensors (nothing injected)."""

    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model)
        self.__dict__["_values"] = spec.make_tuner(model)

    @property
    def values(self):  # noqa: ANN201 - the method's value store (SelectiveValues)
        return self.__dict__["_values"]

    def add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        self.values.add(adapter_name, config)  # raises before changing anything

    def remove(self, adapter_name: str) -> None:
        self.values.remove(adapter_name)

    def activate(self, adapter_name: str) -> None:
        self.values.activate(adapter_name)

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        return self.values.disabled()

    def merge(self, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool) -> None:
        """The active adapter's values already are the model's weights: nothing to fold."""

    def unload(self, merge: bool, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool = False) -> nn.Module:
        if merge and len(names) != 1:
            raise AdapterStateError(
                f"{type(configs[names[0]]).__name__} adapters replace weight values, so they cannot be "
                f"combined; merge exactly one adapter (got {list(names)})."
            )
        self.values.finish(keep=names[0] if merge else None)
        return surgery.unload(self.model, merge=False)

    def adapter_tensors(self, adapter_name: str, config: "PeftConfig") -> dict[str, torch.Tensor]:
        return dict(self.values.tensors(adapter_name))

    def no_mixed_batches(self) -> AdapterStateError:
        return AdapterStateError(
            "SelectiveConfig changes the model's own weights, so one forward pass can use only one adapter; "
            "run each adapter's rows separately after set_adapter()."
        )

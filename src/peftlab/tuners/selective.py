"""Selective tuning's tuner: the model's own tensors, with values swapped between adapters.

No module is replaced, so the tree is the model's own (``base_model.model.<parameter>``); the
values of inactive adapters and the base values live in the method's value store
(a :class:`ValueStore`; selective tuning's is :class:`peftlab.methods.selective.SelectiveValues`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from peftlab import limits, surgery
from peftlab.errors import AdapterStateError
from peftlab.tuners.base import Tuner

if TYPE_CHECKING:
    from peftlab.config import PeftConfig


class ValueStore(Protocol):
    """The values of a method that trains tensors the model already has: one store per model."""

    def add(self, adapter_name: str, config: "PeftConfig") -> None:
        """Register an adapter; raise before changing anything when the config selects nothing."""

    def remove(self, adapter_name: str) -> None:
        """Forget an adapter; the model gets back the base values of its tensors if it was active."""

    def activate(self, adapter_name: str) -> None:
        """Put this adapter's values into the model (the previous active one is stashed)."""

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the model holds the base values."""

    def tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors by parameter name: the live ones if active, stored values if not."""

    def finish(self, keep: str | None) -> None:
        """Drop the store's state: keep adapter ``keep``'s values in the model, or the base values."""


class SelectiveTuner(Tuner):
    """Adapters that are values of the model's own tensors (nothing injected)."""

    def __init__(self, model: nn.Module, values: ValueStore) -> None:
        super().__init__(model)
        self.__dict__["_values"] = values

    @property
    def values(self) -> ValueStore:
        return self.__dict__["_values"]

    def add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        with limits.regex_budget():  # trainable_parameter_patterns: one time bound for all matches
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

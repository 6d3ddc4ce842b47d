"""The Tuner interface: what PeftModel asks of a method kind, whatever the method does to the model.

PeftModel owns the configs and the active adapter's name and checks user input; a tuner owns
the model-side state of every adapter of one kind and the operations on it:

* :class:`~peftlab.tuners.layers.LayerTuner` - layer surgery (LoRA, DoRA, IA3, LoHa, LoKr,
  AdaLoRA, bottleneck): adapted layers inside the model;
* :class:`~peftlab.tuners.prompt.PromptTuner` - prompt learning: model-level virtual tokens
  that rewrite the inputs;
* :class:`~peftlab.tuners.selective.SelectiveTuner` - selective tuning: the model's own tensors,
  with values swapped between adapters.

A tuner is an ``nn.Module`` whose ``model`` is the user's model. For layer and selective methods
it is ``PeftModel.base_model`` (peft's tree: ``base_model.model.<path>``); for prompt methods
peft keeps the bare model as ``base_model``, so PeftModel registers the tuner's parts itself.

Every operation that adds state must be undone by :meth:`Tuner.remove` even when it failed
halfway: that is PeftModel's one rollback path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftlab import surgery
from peftlab.errors import AdapterStateError
from peftlab.layers import LayerWrapper, ModulesToSave, read_through
from peftlab.tuners.surface import PeftTunerSurface

if TYPE_CHECKING:
    from peftlab.config import PeftConfig


class Tuner(PeftTunerSurface, nn.Module):
    """Base of the three tuner kinds; defaults fit a kind that cannot merge or mix batches."""

    #: Prefix of this kind's adapter keys in adapter files (peft's layout).
    key_prefix: ClassVar[str] = "base_model.model."
    #: Whether several adapters can be active at once (their updates add up, as in peft).
    several_active: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    # ----- adapters ---------------------------------------------------------------------------
    def add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        """Build adapter ``adapter_name``; ``active`` is the adapter the model follows now."""
        raise NotImplementedError

    def remove(self, adapter_name: str) -> None:
        """Delete every trace of ``adapter_name`` (also after a failed :meth:`add`)."""
        raise NotImplementedError

    def discard(self, adapter_name: str) -> None:
        """Undo a failed add: :meth:`remove`, plus whatever the add changed in the base model."""
        self.remove(adapter_name)

    def activate(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one forward uses."""
        raise NotImplementedError

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the model computes as the base model."""
        raise NotImplementedError

    # ----- merging ------------------------------------------------------------------------------
    def merge(self, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool) -> None:
        """Fold adapters ``names`` into the base weights."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""

    def unload(self, merge: bool, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool = False) -> nn.Module:
        """Take the adapters out and return the plain model; with ``merge`` fold ``names`` in first."""
        raise NotImplementedError

    # ----- tensors ------------------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str, config: "PeftConfig") -> dict[str, torch.Tensor]:
        """The live tensors of one adapter keyed by their path in ``model`` (checkpoint names)."""
        return wrapper_tensors(self.model, adapter_name)

    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors saved under their own full key (prompt rows), beside the prefixed ones."""
        return {}

    def load_extra_saved(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`extra_saved_tensors` named."""

    def mark_trainable(self, adapter_name: str, config: "PeftConfig") -> None:
        """Freeze everything, then unfreeze adapter ``adapter_name`` unless it is for inference."""
        for param in self.parameters():
            param.requires_grad_(False)
        if not config.inference_mode:
            self.set_adapter_trainable(adapter_name, config, True)

    def set_adapter_trainable(self, adapter_name: str, config: "PeftConfig", requires_grad: bool) -> None:
        """Switch training of adapter ``adapter_name``'s own tensors on or off, leaving every other flag as it is."""
        for tensor in self.trainable_tensors(adapter_name, config):
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad_(requires_grad)

    def trainable_tensors(self, adapter_name: str, config: "PeftConfig") -> list[torch.Tensor]:
        return list(self.adapter_tensors(adapter_name, config).values())

    # ----- forward ------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise self.no_mixed_batches()
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise self.no_mixed_batches()
        return self.model.generate(*args, **kwargs)

    def no_mixed_batches(self) -> AdapterStateError:
        return AdapterStateError(f"mixed-batch adapter_names is not supported by {type(self).__name__}; run one adapter per batch.")

    def __getattr__(self, name: str) -> Any:
        # As in peft: ``peft_model.base_model.config`` and friends reach the wrapped model.
        return read_through(self, name, "model")


def wrapper_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_name`` in the model's adapted layers and heads, keyed as in files."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, LayerWrapper) and adapter_name in module.adapters:
            for key, tensor in module.adapters[adapter_name].held_tensors().items():
                out[prefix + key] = tensor
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[prefix + key] = tensor
    return out


@contextlib.contextmanager
def wrappers_disabled(model: nn.Module) -> Iterator[None]:
    """Every adapted layer and head of ``model`` computes as its base inside the block."""
    wrappers = [w for _, w in surgery.iter_wrappers(model)]
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.disabled = False


def follow_active(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Every wrapper of ``model`` uses ``adapter_names`` (one name, or several in order) in forward."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for _, wrapper in surgery.iter_wrappers(model):
        wrapper.active_adapters = list(names)


def check_modules_to_save(model: nn.Module, config: "PeftConfig") -> None:
    """Refuse user-named modules_to_save that match nothing.

    Task-head names (any task's: peft writes them into saved configs) may be absent and are skipped,
    as peft skips them.
    """
    from peftlab.config import CLASSIFIER_HEAD_NAMES
    from peftlab.errors import TargetModuleError

    task_heads = {h for heads in CLASSIFIER_HEAD_NAMES.values() for h in heads}
    missing = [h for h in (config.modules_to_save or []) if h not in task_heads and not has_module(model, h)]
    if missing:
        raise TargetModuleError(
            f"modules_to_save {missing} match no module in {type(model).__name__}; "
            f"top-level modules are: {[n for n, _ in model.named_children()]}."
        )


def has_module(model: nn.Module, name: str) -> bool:
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())

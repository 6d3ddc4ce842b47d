"""AdaLoRA: LoRA in SVD form whose rank budget shrinks during training.

``adalora.py`` holds the config, the SVD adapter and the registration; ``budget.py`` the explicit
training hooks (:func:`update_and_allocate`, :func:`orthogonal_regularization`), which import
the adapter, never the reverse; ``callback.py`` the transformers ``TrainerCallback`` that calls
those hooks. The callback imports transformers' Trainer machinery, so it loads only when
``AdaLoraCallback`` is asked for (here or as ``peftlab.AdaLoraCallback``).
"""

from typing import TYPE_CHECKING, Any

from peftlab.methods.adalora.adalora import AdaLoraConfig, SvdAdapter, make_adalora_adapter, svd_adapters
from peftlab.methods.adalora.budget import ImportanceState, budget_schedule, orthogonal_regularization, update_and_allocate

if TYPE_CHECKING:
    from peftlab.methods.adalora.callback import AdaLoraCallback

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "ImportanceState",
    "SvdAdapter",
    "budget_schedule",
    "make_adalora_adapter",
    "orthogonal_regularization",
    "svd_adapters",
    "update_and_allocate",
]


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":
        from peftlab.methods.adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

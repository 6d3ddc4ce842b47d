"""Tuners: the model-side half of a PeftModel, one kind per way a method changes the model.

See :mod:`peftlab.tuners.base` for the interface and the three kinds.
"""

from __future__ import annotations

from torch import nn

from typing import TYPE_CHECKING

from peftlab.tuners.base import Tuner
from peftlab.tuners.layer import LayerTuner
from peftlab.tuners.prompt import PromptTuner
from peftlab.tuners.selective import SelectiveTuner

if TYPE_CHECKING:
    from peftlab.registry import MethodSpec

__all__ = ["LayerTuner", "PromptTuner", "SelectiveTuner", "Tuner", "tuner_for"]


def tuner_for(model: nn.Module, spec: "MethodSpec") -> Tuner:
    """The tuner kind that fits ``spec``'s method, wrapped around ``model``."""
    if spec.make_tuner is not None:
        return spec.make_tuner(model, spec)
    if spec.make_model_adapter is not None:
        return PromptTuner(model, spec)
    return LayerTuner(model, spec)

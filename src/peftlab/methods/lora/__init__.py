"""LoRA and DoRA: a trained low-rank update ``s * B A`` added to a frozen layer.

``lora.py`` holds the config, the factory that picks an adapter for each base layer kind and the
registration; ``layers.py`` the adapters (Linear / Conv1D, Embedding, Conv2d); ``dora.py`` the
weight-decomposed variant, which builds on :class:`LoraLinear`. The factory imports both, and
neither imports the factory, so the three modules form no cycle. AdaLoRA (``methods/adalora``)
extends :class:`LoraConfig`.
"""

from peftlab.methods.lora.dora import DoraLinear, Magnitude, make_dora_adapter
from peftlab.methods.lora.layers import LoraConv2d, LoraEmbedding, LoraLinear
from peftlab.methods.lora.lora import LORA_DEFAULT_TARGETS, LoraConfig, lora_bias_parameters, make_lora_adapter

__all__ = [
    "LORA_DEFAULT_TARGETS",
    "DoraLinear",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLinear",
    "Magnitude",
    "lora_bias_parameters",
    "make_dora_adapter",
    "make_lora_adapter",
]

"""IA3: learned vectors that rescale a layer's input or output (``ia3.py``: config, adapter, registration)."""

from peftlab.methods.ia3.ia3 import IA3_DEFAULT_TARGETS, IA3Adapter, IA3Config

__all__ = ["IA3_DEFAULT_TARGETS", "IA3Adapter", "IA3Config"]

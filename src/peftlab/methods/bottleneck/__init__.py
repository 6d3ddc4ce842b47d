"""Bottleneck adapters (Houlsby / Pfeiffer): a small non-linear network in a sub-layer's residual
branch (``bottleneck.py``: config, adapter, placement defaults, registration)."""

from peftlab.methods.bottleneck.bottleneck import BottleneckAdapter, BottleneckConfig

__all__ = ["BottleneckAdapter", "BottleneckConfig"]

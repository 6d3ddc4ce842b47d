"""The LyCORIS family, LoHa and LoKr: a full-size ``dW`` built from a few small factors.

``base.py`` holds what both share (config fields, forward, dropout, merging); ``loha.py`` and
``lokr.py`` each add only how ``dW`` is built, their config and their registration.
"""

from peftlab.methods.lycoris.base import LycorisAdapter, LycorisConfig
from peftlab.methods.lycoris.loha import LoHaAdapter, LoHaConfig
from peftlab.methods.lycoris.lokr import LoKrAdapter, LoKrConfig

__all__ = ["LoHaAdapter", "LoHaConfig", "LoKrAdapter", "LoKrConfig", "LycorisAdapter", "LycorisConfig"]

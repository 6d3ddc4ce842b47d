"""OFT: the input of a linear layer rotated block by block by trained orthogonal matrices (``oft.py``:
config, the Cayley transform, the layer adapter, registration)."""

from peftlab.methods.oft.oft import OFTConfig, OftLinear, cayley, make_oft_adapter, skew_symmetric

__all__ = ["OFTConfig", "OftLinear", "cayley", "make_oft_adapter", "skew_symmetric"]

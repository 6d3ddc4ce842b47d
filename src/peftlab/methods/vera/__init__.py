"""VeRA: frozen random projections shared by all of an adapter's layers, two trained vectors per layer
(``vera.py``: config, the layer adapter, the tuner that keeps the shared projections, registration)."""

from peftlab.methods.vera.vera import VeraConfig, VeraLinear, VeraTuner, shared_projections

__all__ = ["VeraConfig", "VeraLinear", "VeraTuner", "shared_projections"]

"""Selective tuning (BitFit, last-N layers, norms, regexes): trains tensors the model already has and
inserts nothing (``selective.py``: config, selection, registration); driven by
:class:`peftlab.tuners.selective.SelectiveTuner`."""

from peftlab.methods.selective.selective import SelectiveConfig, SelectiveValues, select_parameters

__all__ = ["SelectiveConfig", "SelectiveValues", "select_parameters"]

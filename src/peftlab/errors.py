"""Exceptions peftlab raises for bad input; each message names the problem and the fix."""

from __future__ import annotations


class PeftlabError(Exception):
    """Base class for every error peftlab raises on purpose."""


class PeftConfigError(PeftlabError, ValueError):
    """A config value is out of range, of the wrong type, or inconsistent."""


class TargetModuleError(PeftlabError, ValueError):
    """The requested target modules do not exist in the model or cannot be adapted."""


class CheckpointError(PeftlabError, ValueError):
    """An adapter checkpoint is missing, damaged, or does not fit the model."""


class AdapterStateError(PeftlabError, ValueError):
    """An adapter operation does not fit the current state (unknown name, already merged, ...)."""


class QuantizationError(PeftlabError, ValueError):
    """Quantized (4-/8-bit) base weights cannot be built or used as asked (e.g. bitsandbytes missing)."""


class ModelNotFoundError(PeftlabError, ValueError):
    """A model name is neither a known alias, a local folder, nor a hub id."""


class WorkbenchError(PeftlabError, ValueError):
    """An experiment file, data set or command-line request for the workbench is unusable."""

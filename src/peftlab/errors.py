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


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the calling function point at the first
    frame outside peftlab (the user's line), however deep inside peftlab the warning starts."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)  # the function about to call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
        level += 1
    return level


class NoMatchingPeftModuleError(TargetModuleError):
    """The config's target_modules select no module of the model (peft's name for this case)."""


# peft's name for the base of its errors.
PeftError = PeftlabError

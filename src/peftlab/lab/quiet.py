"""Third-party noise off unless asked for (``peftlab -v``).

transformers logs a LOAD REPORT for every classifier head it initialises (expected when
fine-tuning) and bitsandbytes warns about an optional CPU kernel package even when nothing is
quantized. Both go through ``logging``; this sets their levels. The choice travels to the
worker processes of ``peftlab compare`` in ``PEFTLAB_VERBOSE``.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "PEFTLAB_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("0", "", "false", "False")


def apply(verbose_flag: bool | None = None) -> None:
    """Set the loggers for this process (and, through the environment, its children)."""
    if verbose_flag is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose_flag else "0"
    if verbose():
        return
    # Read by transformers when its logging is first set up; setting the level covers the case
    # where transformers was imported already.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()

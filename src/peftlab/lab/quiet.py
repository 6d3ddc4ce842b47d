"""Third-party noise off unless asked for (``peftlab -v``).

transformers logs a LOAD REPORT for every classifier head it initialises (expected when
fine-tuning) and bitsandbytes warns about an optional CPU kernel package even when nothing is
quantized. Both go through ``logging``; this sets their levels. Progress bars of model loading
are turned off too (on a terminal ``-v`` keeps them); the Trainer's progress is drawn by
:mod:`peftlab.lab.console`. The choice travels to the
worker processes of ``peftlab compare`` in ``PEFTLAB_VERBOSE``.
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "PEFTLAB_VERBOSE"
_SET_BY_US = "PEFTLAB_QUIETED_TRANSFORMERS"  # so that -v can undo the default it replaced


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("0", "", "false", "False")


def apply(verbose_flag: bool | None = None) -> None:
    """Set the loggers for this process (and, through the environment, its children)."""
    if verbose_flag is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose_flag else "0"
    # Weight-loading and download bars (huggingface_hub / transformers): noise in a log, and on a
    # terminal they push the runs' own progress lines (peftlab.lab.console) up the screen; -v keeps them.
    if not sys.stderr.isatty() or not verbose():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        if "transformers" in sys.modules:  # imported already (an earlier command in this process): switch it off there
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if verbose():
        if os.environ.get(_SET_BY_US) == "1":  # undo what an earlier, quiet apply() did in this process
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
            os.environ.pop(_SET_BY_US)
            logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
        return
    # Read by transformers when its logging is first set up; setting the level covers the case
    # where transformers was imported already.
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ[_SET_BY_US] = "1"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()

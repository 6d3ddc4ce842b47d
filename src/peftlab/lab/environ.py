"""What the workbench reads from the process environment, read in one place.

Offline switches: Hugging Face's libraries each honour their own variable beside ``HF_HUB_OFFLINE``
(transformers ``TRANSFORMERS_OFFLINE`` for models, datasets ``HF_DATASETS_OFFLINE`` for data), so
"offline" depends on what is being loaded. Distributed runs: ``torchrun`` sets ``RANK`` and
``WORLD_SIZE`` for every process.
"""

from __future__ import annotations

import os

_OFFLINE_VARIABLES = {"models": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), "data": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}


def _is_set(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("0", "", "false", "False")


def offline(kind: str = "models") -> bool:
    """Whether loading ``kind`` ("models" or "data") from the hub is switched off."""
    return any(_is_set(v) for v in _OFFLINE_VARIABLES[kind])


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0

"""Where a run's checkpoints live and which of them can be resumed from.

The Trainer writes ``checkpoints/checkpoint-N`` folders; :class:`peftlab.lab.callbacks.CompleteMark`
adds :data:`COMPLETE_MARK` once every file of one is written. A checkpoint without it was cut
short by a kill and is never resumed from.
"""

from __future__ import annotations

import json
import os

CHECKPOINTS = "checkpoints"

# Written into a checkpoint folder once the Trainer has saved everything in it (see CompleteMark):
# a checkpoint without it was cut short by a kill and is never resumed from.
COMPLETE_MARK = "peftlab-complete.json"


def _numbered_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the ``checkpoint-N`` folders of a run, newest first."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        prefix, _, step = entry.partition("-")
        path = os.path.join(folder, entry)
        if prefix == "checkpoint" and step.isdigit() and os.path.isdir(path):
            found.append((int(step), path))
    return sorted(found, reverse=True)


def is_complete(checkpoint: str) -> bool:
    """True when every file of ``checkpoint`` was written (its completion mark names its step)."""
    try:
        with open(os.path.join(checkpoint, COMPLETE_MARK), encoding="utf-8") as fh:
            step = json.load(fh).get("global_step")
    except (OSError, ValueError, AttributeError):
        return False
    return f"checkpoint-{step}" == os.path.basename(checkpoint)


def last_checkpoint(run_dir: str) -> str | None:
    """The newest *complete* checkpoint of a run (torn ones, cut by a kill mid-write, are skipped)."""
    return next((path for _, path in _numbered_checkpoints(run_dir) if is_complete(path)), None)


def torn_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints newer than :func:`last_checkpoint` whose write was cut short."""
    newest = last_checkpoint(run_dir)
    return [path for _, path in _numbered_checkpoints(run_dir) if path != newest and not is_complete(path)
            and (newest is None or int(path.rsplit("-", 1)[1]) > int(newest.rsplit("-", 1)[1]))]

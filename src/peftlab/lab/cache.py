"""Resumable studies: a finished run is reused when its key matches.

The key hashes everything a run's numbers depend on: its full config (model, method options,
data and train settings, seed), the content of its local data files, and the code (peftlab's
source files, torch and transformers versions). Change any of them and the run trains again;
re-run a study with one more method or seed and only the new runs train.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from peftlab.lab.experiment import RunConfig
from peftlab.lab.results import OK, RunResult, load_run

# Settings that change how a run is shown, not what it computes.
_COSMETIC_TRAIN = ("progress",)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of peftlab's Python sources plus the torch / transformers versions."""
    import torch
    import transformers

    import peftlab

    root = os.path.dirname(os.path.abspath(peftlab.__file__))
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def data_fingerprint(dataset: str) -> str:
    """Content hash of a local data file or folder; a named set is hashed where it resolves to
    (its local copy), so editing that copy invalidates the runs trained on it."""
    from peftlab.lab import named_data

    if not os.path.exists(dataset) and named_data.is_named(dataset):
        name, rest = named_data.split_name(dataset)
        folder, _ = named_data.locate(name, rest or "train")  # local copies only: a fingerprint never downloads
        if folder is None:
            return f"name:{dataset}"
        dataset = str(folder / rest) if rest else str(folder)
    if os.path.isfile(dataset):
        paths = [dataset]
    elif os.path.isdir(dataset):
        paths = sorted(os.path.join(dataset, f) for f in os.listdir(dataset) if os.path.isfile(os.path.join(dataset, f)))
    else:
        return f"name:{dataset}"
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def run_key(run: RunConfig) -> str:
    """The cache key of one run (its name is left out: the folder already names it)."""
    spec: dict[str, Any] = run.to_dict()
    spec.pop("name", None)
    for key in _COSMETIC_TRAIN:
        spec["train"].pop(key, None)
    payload = {"run": spec, "data": data_fingerprint(run.data.dataset), "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(folder: str, key: str) -> RunResult | None:
    """The finished result in ``folder`` when it ended ok under the same key, else None."""
    try:
        result = load_run(folder)
    except (OSError, ValueError, TypeError, KeyError):  # a damaged record is simply not reused
        return None
    if result is not None and result.status == OK and result.config_hash == key:
        return result
    return None

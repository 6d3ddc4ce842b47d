"""Result records: one per run, gathered per study into results.json.

Reports and plots read only these files, so a report can be rebuilt without retraining.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import WorkbenchError
from peftlab.io import atomic_write_text

RESULTS_NAME = "results.json"
RUN_RESULT_NAME = "result.json"
SCHEMA_VERSION = 1

OK, FAILED, INTERRUPTED, DIVERGED = "ok", "failed", "interrupted", "diverged"


@dataclass
class EpochRecord:
    """Numbers for one epoch: mean logged train loss, evaluation after it, its wall time."""

    epoch: int
    train_loss: float | None = None
    eval_loss: float | None = None
    accuracy: float | None = None
    f1: float | None = None
    seconds: float | None = None
    perplexity: float | None = None  # causal_lm: of the answer tokens (accuracy is then exact match)


@dataclass
class RunResult:
    """Everything one run recorded; ``status`` is ok, failed, interrupted or diverged."""

    name: str
    method: str
    status: str = FAILED
    error: str | None = None
    config: dict[str, Any] | None = None  # the method's resolved config (None for full fine-tuning)
    run: dict[str, Any] = field(default_factory=dict)  # the run as requested (model, data, train)
    trainable_params: int | None = None
    total_params: int | None = None
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    train_seconds: float | None = None
    train_tokens: int | None = None  # non-padding input tokens trained on (all epochs)
    tokens_per_second: float | None = None  # train_tokens / train_seconds
    total_seconds: float | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, train loss] pairs
    accuracy: float | None = None
    f1: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None  # causal_lm task: exp(mean answer-token NLL); accuracy = exact match
    task: str = "classification"
    quantization: dict[str, Any] | None = None  # bits, quant_type, double_quant, weight_bytes of the base
    adapter_bytes: int | None = None
    adapter_dir: str | None = None
    num_train: int | None = None
    num_eval: int | None = None
    eval_source: str | None = None
    world_size: int = 1
    # Held-out mode: accuracy / f1 / eval_loss above are on the test split (test_source); the
    # settings were chosen on dev, whose accuracy at the chosen epoch is dev_accuracy.
    dev_accuracy: float | None = None
    best_epoch: int | None = None
    test_source: str | None = None
    num_test: int | None = None
    # per-example predicted class and label on the reported split, for paired comparisons
    predictions: list[int] | None = None
    labels: list[int] | None = None
    config_hash: str | None = None  # cache key: run config + data + code (peftlab.lab.cache)
    environment: dict[str, Any] = field(default_factory=dict)
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        """A record read back from JSON; a value of the wrong type (``accuracy: "abc"``) is a TypeError naming it."""
        if not isinstance(data, dict):
            raise TypeError(f"a run record is a JSON object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = _checked(cls, {k: v for k, v in data.items() if k in known})
        epochs = values.get("epochs") or []
        if not all(isinstance(e, dict) for e in epochs):
            raise TypeError("'epochs' must be a list of JSON objects")
        epoch_fields = {f.name for f in dataclasses.fields(EpochRecord)}
        values["epochs"] = [EpochRecord(**_checked(EpochRecord, {k: v for k, v in e.items() if k in epoch_fields})) for e in epochs]
        return cls(**values)


_JSON_TYPES = {float: (int, float), int: (int,), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def _checked(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` if each has its field's type (None only where the field allows it)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints[key]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed: tuple[type, ...] = ()
        for arg in args:
            allowed += (type(None),) if arg is type(None) else _JSON_TYPES.get(typing.get_origin(arg) or arg, ())
        bad_bool = isinstance(value, bool) and bool not in args  # JSON true is not a number
        if allowed and (not isinstance(value, allowed) or bad_bool):
            raise TypeError(f"{key!r} holds {type(value).__name__} {value!r:.40}, expected {' or '.join(sorted({t.__name__ for t in allowed}))}")
    return values


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def save_run(result: RunResult, run_dir: str) -> str:
    result.finished_at = result.finished_at or now()
    path = os.path.join(run_dir, RUN_RESULT_NAME)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    return path


def load_run(run_dir: str) -> RunResult | None:
    path = os.path.join(run_dir, RUN_RESULT_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return RunResult.from_dict(json.load(fh))


def save_study(output_dir: str, name: str, runs: list[RunResult], command: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> str:
    """results.json; ``extra`` adds study-level records (seeds, the sweep's choice per run group)."""
    data = {"schema": SCHEMA_VERSION, "study": name, "created": now(), "command": command,
            **(extra or {}), "runs": [r.to_dict() for r in runs]}
    path = os.path.join(output_dir, RESULTS_NAME)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def load_study(output_dir: str) -> tuple[str, list[RunResult], dict[str, Any]]:
    """(study name, run results, raw data) from ``output_dir/results.json``."""
    path = os.path.join(output_dir, RESULTS_NAME)
    if not os.path.isfile(path):
        raise WorkbenchError(f"{path} not found; pass the folder that 'peftlab train' or 'peftlab compare' wrote.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{path} is not valid JSON ({exc.msg}); the results file is damaged.") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise WorkbenchError(f"{path} is not a peftlab results file (no 'runs' list).")
    try:
        runs = [RunResult.from_dict(r) for r in data["runs"]]
    except (TypeError, KeyError, ValueError) as exc:
        raise WorkbenchError(f"{path} has a malformed run record ({exc}); the results file is damaged.") from None
    return str(data.get("study", os.path.basename(os.path.abspath(output_dir)))), runs, data

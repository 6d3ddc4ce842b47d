"""Choosing on dev, reporting on test: the best epoch of a run and its held-out test score.

In held-out mode (``data.dev_split`` set) the Trainer evaluates on the dev set after every
epoch; :class:`peftlab.lab.callbacks.BestEpoch` writes the trainable tensors of the epoch with the best dev
accuracy to disk, and :func:`finish` puts them back and scores the test set once. The test rows
never influence a choice. Every run also keeps its per-example predictions on the reported split,
so two methods can be compared example by example (``peftlab.lab.stats.paired_bootstrap``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from peftlab.lab import environ
from peftlab.lab.results import RunResult

BEST_FILE = "best-on-dev{rank}.pt"


def best_path(folder: str) -> str:
    """One file per DDP process: each keeps (identical) tensors of its own, so no process reads a
    file another is still writing."""
    rank = environ.rank()
    return os.path.join(folder, BEST_FILE.format(rank="" if rank == 0 else f".rank{rank}"))


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def restore_best(model: torch.nn.Module, folder: str) -> dict[str, float] | None:
    """Load the best-on-dev tensors back into ``model``; their score, or None when none was kept."""
    path = best_path(folder)
    if not os.path.isfile(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, param in trainable_tensors(model).items():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))
    with open(path + ".json", encoding="utf-8") as fh:
        return json.load(fh)


def predictions_of(trainer: Any, dataset: Any, prefix: str) -> tuple[list[int], list[int], dict[str, float]]:
    """(predicted classes, labels, metrics named ``{prefix}_accuracy`` ...) of one prediction pass."""
    out = trainer.predict(dataset, metric_key_prefix=prefix)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return np.asarray(logits).argmax(-1).tolist(), np.asarray(out.label_ids).tolist(), out.metrics


def finish(result: RunResult, trainer: Any, prep: Any, folder: str) -> None:
    """After training: the reported numbers and per-example predictions.

    Held-out mode: back to the best dev epoch, then one pass over the test set, whose accuracy,
    F1 and loss become the run's reported ones. Otherwise the predictions of the evaluation split
    are recorded next to the numbers ``_final_eval`` already took from it.
    """
    if prep.causal:
        return
    test_set = getattr(prep, "test_set", None)
    if test_set is None:
        result.predictions, result.labels, _ = predictions_of(trainer, prep.eval_set, "eval")
        return
    best = restore_best(prep.model, folder)
    if best is not None:
        result.best_epoch = max(1, int(np.ceil(best["epoch"] - 1e-6)))
        result.dev_accuracy = best["accuracy"]
    else:
        result.dev_accuracy = result.accuracy
        result.best_epoch = result.epochs[-1].epoch if result.epochs else None
    result.predictions, result.labels, metrics = predictions_of(trainer, test_set, "test")
    result.accuracy, result.f1 = metrics.get("test_accuracy"), metrics.get("test_f1")
    result.eval_loss = metrics.get("test_loss")
    result.test_source = prep.splits.test_source
    result.num_test = len(result.labels)

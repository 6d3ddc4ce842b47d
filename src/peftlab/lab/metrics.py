"""Evaluation metrics of the workbench's two tasks.

Classification scores the argmax of the classifier's logits; causal LM scores what the model
generates (exact match of the label word) and the perplexity of the answer tokens, which needs
the model itself rather than the Trainer's collected logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def classification_metrics(pred: Any) -> dict[str, float]:
    """Accuracy and F1 (positive-class F1 for two classes, macro F1 otherwise)."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(pred.label_ids)
    classes = sorted(set(labels.tolist()) | set(predicted.tolist()))
    if len(classes) <= 2:
        classes = [1]
    scores = []
    for c in classes:
        tp = float(((predicted == c) & (labels == c)).sum())
        fp = float(((predicted == c) & (labels != c)).sum())
        fn = float(((predicted != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((predicted == labels).mean()), "f1": float(np.mean(scores))}


def causal_metrics(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], dataset: Sequence[dict[str, list[int]]],
                   template: Any, batch_size: int, max_length: int) -> dict[str, float]:
    """Exact-match accuracy of the greedily generated label words of ``rows`` and the perplexity
    of the answer tokens of ``dataset`` (the same rows, tokenized)."""
    from peftlab.lab.causal import exact_match_accuracy, perplexity

    match = exact_match_accuracy(model, tokenizer, rows, template, batch_size, max_length)
    return {"accuracy": match["accuracy"], "perplexity": perplexity(model, dataset, tokenizer.pad_token_id, batch_size)}

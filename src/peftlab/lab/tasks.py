"""What differs between the workbench's tasks, as parts the one training path plugs in.

:func:`peftlab.lab.runner.execute` trains every run the same way; a task only chooses how rows
become batches, which metrics an evaluation reports, and whether the Trainer keeps logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.lab.metrics import causal_metrics, classification_metrics


@dataclass(frozen=True)
class TaskParts:
    """The task-specific parts of a run.

    Args:
        collator: rows -> a padded batch of tensors.
        compute_metrics: the Trainer's ``compute_metrics`` (metrics from the collected logits), or None.
        model_metrics: ``model -> metrics`` added to every evaluation (generation-based metrics), or None.
        token_rows: the rows are token lists already: keep every column and evaluate the loss
            only (the logits of a causal LM are never collected).
    """

    collator: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    compute_metrics: Callable[[Any], dict[str, float]] | None = None
    model_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None
    token_rows: bool = False


def classification(tokenizer: Any) -> TaskParts:
    """A classifier head: dynamic padding, accuracy and F1 from the logits."""
    from transformers import DataCollatorWithPadding

    return TaskParts(collator=DataCollatorWithPadding(tokenizer), compute_metrics=classification_metrics)


def causal_lm(tokenizer: Any, eval_rows: Sequence[dict[str, Any]], eval_set: Sequence[dict[str, list[int]]], template: Any,
              batch_size: int, max_length: int) -> TaskParts:
    """The label generated as a word: right padding with masked labels; exact match and perplexity
    on the evaluation rows."""
    from peftlab.lab.causal import collator

    def model_metrics(model: torch.nn.Module) -> dict[str, float]:
        return causal_metrics(model, tokenizer, eval_rows, eval_set, template, batch_size, max_length)

    return TaskParts(collator=collator(tokenizer), model_metrics=model_metrics, token_rows=True)

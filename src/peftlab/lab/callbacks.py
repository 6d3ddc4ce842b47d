"""The workbench's Trainer callbacks: plain ``TrainerCallback`` classes, one concern each.

- :class:`EpochTimer`: wall time of each epoch's training steps.
- :class:`StepTimer`: wall time of each optimizer step (median step time).
- :class:`TrainSummary`: the mean training loss and the steps of a finished run.
- :class:`StopOnSignal` (with :func:`sigterm_sets`): after SIGTERM, finish the step, save a
  checkpoint and stop, so the run can be resumed.
- :class:`FiniteWeights`: stop before a checkpoint is written when a trainable weight became NaN/inf.
- :class:`CompleteMark`: mark a checkpoint complete once the Trainer has written all of it.
- :class:`BestEpoch`: in held-out mode, keep the trainable tensors of the best dev evaluation.

Importing this module imports transformers; the runner imports it only when it trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from peftlab.errors import PeftlabError
from peftlab.io import atomic_write, atomic_write_text
from peftlab.lab import measure
from peftlab.lab.checkpoints import COMPLETE_MARK
from peftlab.lab.selection import best_path, trainable_tensors


class NonFiniteError(PeftlabError, RuntimeError):
    """Training produced a NaN/inf loss or weight, or a diverging loss; the run stops and keeps its last checkpoint."""


# The divergence rule: a training-step loss above DIVERGENCE_FACTOR times max(the first step's loss in
# this process, 1) stops the run as diverged. A cross-entropy loss (classification or next token)
# starts near ln(classes) and a healthy run never reaches 100x that on one batch: the model would give
# the right answer a probability below e^-100. The floor of 1 keeps a near-zero first loss (a model
# that already fits) from making ordinary noise look like divergence.
DIVERGENCE_FACTOR = 100.0


def divergence(loss: float, first: float) -> str | None:
    """Why ``loss`` counts as diverged given the run's first loss ``first``, or None."""
    limit = DIVERGENCE_FACTOR * max(first, 1.0)
    if loss > limit:
        return (f"the training loss grew to {loss:.3g}, over {DIVERGENCE_FACTOR:g}x max(first loss {first:.3g}, 1) "
                f"(the divergence rule)")
    return None


class CompleteMark(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it (on_save runs after)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            atomic_write_text(os.path.join(folder, COMPLETE_MARK), json.dumps({"global_step": state.global_step}))
        return control


class EpochTimer(TrainerCallback):
    """Wall time of each epoch's training steps (evaluation excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._watch: measure.Stopwatch | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._watch = measure.Stopwatch()

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._watch is not None:
            self.seconds.append(self._watch.seconds())
            self._watch = None


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        ordered = sorted(self.times)
        return ordered[len(ordered) // 2] if ordered else float("nan")


class TrainSummary(TrainerCallback):
    """The Trainer's closing numbers: mean training loss over the run and optimizer steps taken."""

    def __init__(self) -> None:
        self.train_loss: float | None = None
        self.steps = 0

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "train_loss" in logs:
            self.train_loss = float(logs["train_loss"])
            self.steps = state.global_step


class StopOnSignal(TrainerCallback):
    """After SIGTERM (see :func:`sigterm_sets`), finish the current step, save a checkpoint and stop."""

    def __init__(self) -> None:
        self.received = False
        self.step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.received:
            control.should_save = True
            control.should_training_stop = True
            self.step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.step is not None:  # stopping: skip the end-of-epoch evaluation, the step's checkpoint is saved
            control.should_evaluate = False
            control.should_save = False
        return control


@contextlib.contextmanager
def sigterm_sets(stopper: StopOnSignal) -> Iterator[None]:
    """Route SIGTERM to ``stopper.received`` for the duration (main thread only)."""
    def handler(signum: int, frame: Any) -> None:
        stopper.received = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class FiniteWeights(TrainerCallback):
    """Stop before a checkpoint is written when an update made a trainable weight NaN/inf."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if model is not None:
            for name, param in model.named_parameters():
                if param.requires_grad and not torch.isfinite(param).all():
                    raise NonFiniteError(f"weight {name} became NaN/inf at step {state.global_step}")
        return control


class BestEpoch(TrainerCallback):
    """Keep the trainable tensors of the best dev evaluation in ``folder`` (read back by
    :func:`peftlab.lab.selection.restore_best`).

    Best = highest dev accuracy, ties to the lower dev loss, then to the earlier epoch. The
    tensors go to disk rather than into a copy in memory, so a method's peak memory stays its own.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = best_path(folder)
        self.score_path = self.path + ".json"
        self.best: dict[str, float] | None = None
        if os.path.isfile(self.score_path):  # a resumed run continues from what it had chosen
            with open(self.score_path, encoding="utf-8") as fh:
                try:
                    self.best = json.load(fh)
                except ValueError:  # torn by a kill before writes were atomic: the next evaluation writes both again
                    self.best = None

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):  # noqa: ANN001
        if model is None or not metrics or metrics.get("eval_accuracy") is None:
            return control
        score = {"accuracy": float(metrics["eval_accuracy"]), "loss": float(metrics.get("eval_loss", float("inf"))),
                 "epoch": round(float(state.epoch or 0), 6)}
        if self.best is None or (score["accuracy"], -score["loss"]) > (self.best["accuracy"], -self.best["loss"]):
            os.makedirs(self.folder, exist_ok=True)
            tensors = {n: p.detach().cpu() for n, p in trainable_tensors(model).items()}
            atomic_write(self.path, lambda tmp: torch.save(tensors, tmp))  # a kill leaves the old file or the new one
            atomic_write_text(self.score_path, json.dumps(score))
            self.best = score
        return control

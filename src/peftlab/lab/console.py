"""What a person watching ``peftlab train`` / ``compare`` sees: one live line per run, one line per study step.

On a terminal a run's line (step, examples/s, loss, time left) is rewritten in place a few times a
second. Elsewhere (a log file, a pipe, CI) the same facts come as plain lines, about one per tenth
of the run and at least one every :data:`LOG_EVERY_SECONDS`, so a log stays short and readable. The
Trainer's own dict logging is replaced by this; ``-v`` prints its dicts again, as plain lines.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LIVE_REFRESH_SECONDS = 0.25  # a terminal line redrawn more often only flickers
LOG_EVERY_SECONDS = 60.0  # a plain log gets a line at least this often while a run trains
LOG_PARTS = 10  # ... and one per tenth of the run's steps


def is_live(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that can redraw a line (not a file, pipe or dumb terminal)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def duration(seconds: float) -> str:
    """Seconds as a short clock: 42s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunLine:
    """The progress of one run's training: live on a terminal, plain lines elsewhere.

    Args:
        name: the run's name, first on every line.
        total_steps: optimizer steps the run will take.
        examples_per_step: training examples per optimizer step (batch x accumulation x processes).
        stream: where lines go (stdout).
        live: redraw one line in place (a terminal) rather than print plain lines.
        clock: monotonic seconds (a test passes its own).
    """

    def __init__(self, name: str, total_steps: int, examples_per_step: int, stream: TextIO | None = None,
                 live: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.total, self.per_step = name, max(int(total_steps), 1), examples_per_step
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_live(self.stream) if live is None else live
        self.clock = clock
        self.loss: float | None = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first step seen: warm-up excluded from rates
        self._drawn = 0.0  # when the live line was last drawn
        self._width = 0  # length of the live line on screen
        self._logged_step, self._logged_at = 0, clock()

    # ----- numbers -------------------------------------------------------------------------------
    def rate(self, step: int) -> float | None:
        """Optimizer steps per second since the first step seen (None before two steps)."""
        if self._first is None or step <= self._first[0]:
            return None
        return (step - self._first[0]) / max(self.clock() - self._first[1], 1e-9)

    def text(self, step: int) -> str:
        rate = self.rate(step)
        parts = [f"step {step}/{self.total} ({100 * step // self.total}%)"]
        if rate is not None:
            parts.append(f"{rate * self.per_step:.0f} examples/s")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if rate is not None and step < self.total:
            parts.append(f"{duration((self.total - step) / rate)} left")
        return f"{self.name}: " + ", ".join(parts)

    # ----- events --------------------------------------------------------------------------------
    def step(self, step: int, loss: float | None = None) -> None:
        """After optimizer step ``step`` (``loss``: the latest logged training loss, if any)."""
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        if loss is not None:
            self.loss = loss
        if self.live:
            if step >= self.total:  # kept on screen, before the last evaluation's line
                self.message(self.text(step))
                self._logged_step = step
            elif now - self._drawn >= LIVE_REFRESH_SECONDS:
                self._draw(self.text(step))
                self._drawn = now
            return
        part = max(1, self.total // LOG_PARTS)
        due = self._logged_step == 0 or step // part > self._logged_step // part or now - self._logged_at >= LOG_EVERY_SECONDS
        if due or step >= self.total:
            self.message(self.text(step))
            self._logged_step, self._logged_at = step, now

    def finish(self, step: int) -> None:
        """The run's last line, kept on screen (unless the last step printed it already)."""
        if self._logged_step != step:
            self.message(self.text(step))
            self._logged_step = step

    def evaluating(self, done: int, total: int | None) -> None:
        """While evaluating (live only: a plain log gets the result line, not the batches)."""
        if self.live and (self.clock() - self._drawn >= LIVE_REFRESH_SECONDS or done == total):
            self._draw(f"{self.name}: evaluating, batch {done}" + (f"/{total}" if total else ""))
            self._drawn = self.clock()

    def message(self, text: str) -> None:
        """A plain line (clearing a live line first)."""
        self.clear()
        print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _draw(self, text: str) -> None:
        columns = _columns()
        text = text[: columns - 1] if columns else text
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def progress_callback(name: str, examples_per_step: int, eval_name: str, live: bool | None = None,
                      verbose: bool = False, stream: TextIO | None = None) -> Any:
    """A ``TrainerCallback`` that draws :class:`RunLine` (imports transformers: call it when training)."""
    from transformers import TrainerCallback

    class ProgressLine(TrainerCallback):
        """Feeds the Trainer's steps, logs and evaluations to a :class:`RunLine`."""

        def __init__(self) -> None:
            self.line: RunLine | None = None
            self._eval_batches = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
            if state.is_world_process_zero:
                self.line = RunLine(name, state.max_steps, examples_per_step, stream=stream, live=live)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.line is not None:
                self.line.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.line is None or not logs:
                return
            if "loss" in logs:
                self.line.loss = float(logs["loss"])
            if verbose:  # the Trainer's own dicts, as its PrinterCallback prints them
                self.line.message(str({k: v for k, v in logs.items() if k != "total_flos"}))

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):  # noqa: ANN001
            if self.line is not None:
                self._eval_batches += 1
                total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
                self.line.evaluating(self._eval_batches, total)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
            self._eval_batches = 0
            if self.line is None or not metrics:
                return
            shown = [f"{key[5:]} {metrics[key]:.4f}" for key in ("eval_accuracy", "eval_f1", "eval_loss", "eval_perplexity")
                     if isinstance(metrics.get(key), (int, float))]
            epoch = f"epoch {state.epoch:.3g}" if state.epoch is not None else f"step {state.global_step}"
            self.line.message(f"{name}: {epoch}, {eval_name} " + ", ".join(shown))

        def on_predict(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
            self._eval_batches = 0  # the held-out test pass: its numbers are the run's result line
            if self.line is not None:
                self.line.clear()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.line is not None:
                self.line.finish(state.global_step)

    return ProgressLine()

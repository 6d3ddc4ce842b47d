"""One training run: build the model and data, train with the HF Trainer, measure, save.

Every task takes this one path: :func:`execute` trains with :class:`peftlab.lab.trainer.LabTrainer`
and plugs in the task's parts (:class:`peftlab.lab.tasks.TaskParts`: collator, metrics). The
Trainer does the training so ``torchrun`` / ``accelerate launch`` (DDP) and checkpoint resume
behave as users of transformers expect; the callbacks of :mod:`peftlab.lab.callbacks` add what
the workbench needs (epoch timing, a clean stop on SIGTERM, a stop on a NaN/inf weight that keeps
the last good checkpoint, checkpoint completion marks, the best dev epoch).

Run as a module (``python -m peftlab.lab.runner RUN_DIR``), it trains the run described by
``RUN_DIR/run.json``; ``peftlab compare`` starts one such process per method.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from peftlab.errors import PeftlabError, WorkbenchError
from peftlab.lab import measure, selection
from peftlab.lab import environ
from peftlab.lab.checkpoints import CHECKPOINTS, COMPLETE_MARK, last_checkpoint, torn_checkpoints
from peftlab.lab.experiment import RunConfig
from peftlab.lab.methods import trainer_callbacks
from peftlab.lab.results import DIVERGED, FAILED, INTERRUPTED, OK, EpochRecord, RunResult, save_run
from peftlab.lab.setup import Prepared, parameter_counts

RUN_SPEC_NAME = "run.json"


KEPT_CHECKPOINTS = 2  # the newest checkpoints kept while training (each holds the model and optimizer state)


world_size = environ.world_size  # (imported by name elsewhere in the workbench)
is_main_process = environ.is_main_process


def execute(run: RunConfig, run_dir: str, *, resume: bool = False, prepared: Prepared | None = None,
            callbacks: Sequence[Any] = ()) -> RunResult:
    """Train ``run``; write checkpoints, the adapter and ``result.json`` under ``run_dir``.

    Bad input raises before anything is written. Failures during training are returned as
    a result with status failed / diverged / interrupted (and saved on the main process).
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (progress, step timing).
    """
    from peftlab.lab.callbacks import NonFiniteError, sigterm_sets

    resume_from = None
    if resume:
        resume_from = last_checkpoint(run_dir)
        if resume_from is None:
            torn = [os.path.basename(p) for p in torn_checkpoints(run_dir)]
            raise WorkbenchError(f"--resume: no checkpoint written completely in {os.path.join(run_dir, CHECKPOINTS)}"
                                 f"{f' ({len(torn)} cut short by a kill: {torn})' if torn else ''}; "
                                 f"start the run without --resume.")
        for path in torn_checkpoints(run_dir):
            if is_main_process():
                print(f"peftlab: skipping {os.path.basename(path)}: its write was cut short (no {COMPLETE_MARK}); "
                      f"resuming from {os.path.basename(resume_from)}", file=sys.stderr)
                shutil.rmtree(path, ignore_errors=True)  # else the Trainer would count it among the kept checkpoints
    total = measure.Stopwatch()
    prep = prepared or Prepared(run)
    result = RunResult(name=run.name, method=run.method, run=run.to_dict(), world_size=world_size(),
                       environment=measure.environment())
    result.config = prep.peft_config.to_dict() if prep.peft_config is not None else None
    if hasattr(prep.model, "peft_config"):
        result.config = prep.model.peft_config["default"].to_dict()  # with model defaults filled in
    result.trainable_params, result.total_params = parameter_counts(prep.model)
    result.num_train, result.num_eval = len(prep.train_set), len(prep.eval_set)
    result.eval_source = prep.splits.eval_source
    result.task = run.task
    result.quantization = prep.quantization

    checkpoints = os.path.join(run_dir, CHECKPOINTS)
    if is_main_process():
        os.makedirs(run_dir, exist_ok=True)
        if not resume and os.path.isdir(checkpoints):
            shutil.rmtree(checkpoints)  # stale checkpoints of an earlier run would be resumed by mistake
    trainer, timer, stopper = _make_trainer(run, prep, checkpoints, callbacks)
    train_watch = measure.Stopwatch()
    interrupted = False
    try:
        with sigterm_sets(stopper):
            trainer.train(resume_from_checkpoint=resume_from)
        result.train_seconds = train_watch.seconds()
        _fill_history(result, trainer, timer.seconds)
        if resume_from is None and getattr(trainer.state, "num_input_tokens_seen", 0):
            # tokens/s of this process's training (after a resume the count includes the earlier process's)
            result.train_tokens = int(trainer.state.num_input_tokens_seen)
            result.tokens_per_second = round(result.train_tokens / max(result.train_seconds, 1e-9), 1)
        if stopper.received and stopper.step is not None and trainer.state.global_step < trainer.state.max_steps:
            result.status = INTERRUPTED
            result.error = (f"stopped by SIGTERM after step {stopper.step}; checkpoint saved in {checkpoints}. "
                            f"Run the same command with --resume to continue.")
        else:
            if len(prep.eval_set):
                _final_eval(result, trainer)
            selection.finish(result, trainer, prep, checkpoints)
            if hasattr(prep.model, "peft_config"):  # methods such as AdaLoRA settle their config while training
                result.config = prep.model.peft_config["default"].to_dict()
            result.status = OK
            if is_main_process():
                _save_model(result, prep, run_dir)
                if not run.train.keep_checkpoints:
                    shutil.rmtree(checkpoints, ignore_errors=True)
    except KeyboardInterrupt:  # Ctrl-C: record where the run got to, then stop as asked
        interrupted = True
        kept = last_checkpoint(run_dir)
        where = f"the last checkpoint is {kept}; run the same command with --resume to continue" if kept else \
            "no checkpoint had been written yet; run the command again"
        _stopped_early(result, trainer, timer, train_watch, INTERRUPTED,
                       f"interrupted (Ctrl-C) after step {trainer.state.global_step}; {where}.")
    except NonFiniteError as exc:
        kept = last_checkpoint(run_dir)
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been written yet"
        advice = f"Lower train.learning_rate (was {run.train.learning_rate:g})."
        _stopped_early(result, trainer, timer, train_watch, DIVERGED, f"{exc}; training stopped and {where}. {advice}")
    except Exception as exc:  # noqa: BLE001 - a crash mid-training is this run's result, not the caller's problem
        traceback.print_exc()
        _stopped_early(result, trainer, timer, train_watch, FAILED, failure_message(exc))
    result.peak_rss_mb = round(measure.peak_rss_mb(), 1)
    cuda = measure.cuda_peak_mb()
    result.cuda_peak_mb = round(cuda, 1) if cuda is not None else None
    result.total_seconds = total.seconds()
    if is_main_process():
        save_run(result, run_dir)
    if interrupted:
        raise KeyboardInterrupt  # the caller stops too (one line, exit 130); result.json says interrupted
    return result


def _stopped_early(result: RunResult, trainer: Any, timer: Any, train_watch: measure.Stopwatch, status: str, error: str) -> None:
    """Record what a run that ended before its last step got done, and why it ended."""
    result.train_seconds = train_watch.seconds()
    _fill_history(result, trainer, timer.seconds)
    result.status = status
    result.error = error


def _make_trainer(run: RunConfig, prep: Prepared, output_dir: str, extra_callbacks: Sequence[Any] = ()) -> tuple[Any, Any, Any]:
    """The run's Trainer with the task's parts plugged in, and its epoch timer and SIGTERM stopper."""
    from transformers import PrinterCallback, TrainingArguments

    from peftlab.lab import quiet
    from peftlab.lab.console import progress_callback

    from peftlab.lab.callbacks import BestEpoch, CompleteMark, EpochTimer, FiniteWeights, StopOnSignal
    from peftlab.lab.trainer import LabTrainer

    cfg = run.train
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size()
    steps_per_epoch = max(1, math.ceil(len(prep.train_set) / per_step))
    cpu = cfg.cpu or not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of all steps
        lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
        eval_strategy="epoch" if len(prep.eval_set) else "no",  # no rows to evaluate: train_causal without eval_rows
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=KEPT_CHECKPOINTS,
        logging_strategy="steps",
        logging_steps=max(1, min(cfg.logging_steps, steps_per_epoch)),
        report_to=[],
        use_cpu=cpu,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",  # tokens/s for every run
        ddp_backend="gloo" if world_size() > 1 and cpu else None,
        disable_tqdm=True,  # peftlab.lab.console draws the run's progress
        **_sampling(cfg.group_by_length),
        dataloader_num_workers=0,
        # Classification losses are per-example means and ignore num_items_in_batch; with this on,
        # the Trainer would still multiply the loss by the number of processes under DDP.
        average_tokens_across_devices=False,
        # causal_lm: the rows are already token lists; metrics come from generation, not logits
        remove_unused_columns=not prep.task.token_rows,
        prediction_loss_only=prep.task.token_rows,
    )
    timer, stopper = EpochTimer(), StopOnSignal()
    callbacks = [timer, stopper, FiniteWeights(), CompleteMark(), *trainer_callbacks(prep.peft_config, prep.model)]
    if prep.test_set is not None:  # held-out mode: remember the best epoch on dev
        callbacks.append(BestEpoch(output_dir))
    trainer = LabTrainer(
        model=prep.model,
        args=args,
        train_dataset=prep.train_set,
        eval_dataset=prep.eval_set,
        data_collator=prep.task.collator,
        compute_metrics=prep.task.compute_metrics,
        callbacks=[*callbacks, *extra_callbacks],
        head_learning_rate=cfg.head_learning_rate,
        model_metrics=prep.task.model_metrics,
    )
    trainer.remove_callback(PrinterCallback)  # its dicts come back with -v, through the progress line
    if is_main_process():
        trainer.add_callback(progress_callback(run.name, per_step, "dev" if prep.test_set is not None else "eval",
                                               live=None if cfg.progress else False, verbose=quiet.verbose()))
    return trainer, timer, stopper


def _sampling(group_by_length: bool) -> dict[str, Any]:
    """The TrainingArguments that pick length-grouped batches (transformers 5.25 renamed the flag)."""
    import dataclasses

    from transformers import TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def _fill_history(result: RunResult, trainer: Any, epoch_seconds: list[float]) -> None:
    """Loss curve and per-epoch numbers from the Trainer's log (it survives resume)."""
    history = trainer.state.log_history
    result.loss_curve = [[float(h["step"]), float(h["loss"])] for h in history if "loss" in h and "step" in h]
    evals = [h for h in history if "eval_loss" in h]
    epochs: dict[int, EpochRecord] = {}
    for h in evals:
        e = max(1, math.ceil(round(float(h.get("epoch", 0)), 6)))
        epochs[e] = EpochRecord(epoch=e, eval_loss=h.get("eval_loss"), accuracy=h.get("eval_accuracy"), f1=h.get("eval_f1"),
                                  perplexity=h.get("eval_perplexity"))
    for e, record in epochs.items():
        losses = [float(h["loss"]) for h in history if "loss" in h and e - 1 < float(h.get("epoch", 0)) <= e + 1e-9]
        record.train_loss = sum(losses) / len(losses) if losses else None
    # Epoch times: the ones measured in this process belong to the last epochs (resume).
    ordered = sorted(epochs.values(), key=lambda r: r.epoch)
    for record, seconds in zip(ordered[len(ordered) - len(epoch_seconds):] if epoch_seconds else [], epoch_seconds[-len(ordered):]):
        record.seconds = seconds
    result.epochs = ordered


def _final_eval(result: RunResult, trainer: Any) -> None:
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is None or last.get("step") != trainer.state.global_step:
        last = {**trainer.evaluate(), "step": trainer.state.global_step}
    result.eval_loss = last.get("eval_loss")
    result.accuracy = last.get("eval_accuracy")
    result.f1 = last.get("eval_f1")
    result.perplexity = last.get("eval_perplexity")


def _save_model(result: RunResult, prep: Prepared, run_dir: str) -> None:
    """The adapter (or, for full fine-tuning, the whole model) whose size the report compares."""
    from peftlab import adapter_folder

    folder = os.path.join(run_dir, "adapter" if prep.peft_config is not None else "model")
    sizes: list[int] = []

    def write(staging: str) -> None:
        prep.model.save_pretrained(staging)
        sizes.append(measure.folder_bytes(staging))
        if prep.causal:  # so `peftlab generate FOLDER` finds the tokenizer (not counted in adapter_bytes)
            prep.tokenizer.save_pretrained(staging)

    # A finished run's folder is replaced by one swap: a kill at any instant leaves the old version or the new
    # one, never no folder while result.json says ok (and nothing of an earlier training is kept).
    adapter_folder.save_folder(folder, write, carry_over=False)
    result.adapter_dir = os.path.relpath(folder, run_dir)
    result.adapter_bytes = sizes[0]


# ----- worker process ------------------------------------------------------------------------------
def failure_message(exc: BaseException) -> str:
    """One line for the run record: our own errors as they are, others with their type."""
    message = str(exc) if isinstance(exc, PeftlabError) else f"{type(exc).__name__}: {exc}"
    return message.strip().splitlines()[0] if message.strip() else repr(exc)


def worker_main(argv: list[str] | None = None) -> int:
    """Train the run in ``RUN_DIR/run.json``; exit 0 when it finished with status ok."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m peftlab.lab.runner RUN_DIR", file=sys.stderr)
        return 2
    run_dir = argv[0]
    with open(os.path.join(run_dir, RUN_SPEC_NAME), encoding="utf-8") as fh:
        run = RunConfig.from_dict(json.load(fh))
    try:
        result = execute(run, run_dir)
    except KeyboardInterrupt:  # the study's process got the same Ctrl-C and reports it in one line
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure of this run is recorded, never raised to the study
        result = RunResult(name=run.name, method=run.method, status=FAILED, error=failure_message(exc),
                           run=run.to_dict(), environment=measure.environment())
        result.peak_rss_mb = round(measure.peak_rss_mb(), 1)
        save_run(result, run_dir)
        if not isinstance(exc, PeftlabError):
            traceback.print_exc()
        print(f"peftlab: run {run.name} failed: {result.error}", file=sys.stderr)
    return 0 if result.status == OK else 1


if __name__ == "__main__":
    sys.exit(worker_main())

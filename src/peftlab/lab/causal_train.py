"""``train_causal``: fine-tune a causal LM to answer with the label word, as one function call.

A thin wrapper over the workbench's one training path (:func:`peftlab.lab.runner.execute`): it
adapts the model, describes the call as a causal-LM run, trains it in a scratch folder, and
returns what was measured. The prompts, the masked-label dataset and the metrics come from
:mod:`peftlab.lab.causal`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftlab.errors import PeftConfigError, WorkbenchError
from peftlab.lab.causal import PromptTemplate, load_causal_lm
from peftlab.lab.experiment import DataConfig, RunConfig, TrainConfig
from peftlab.lab.results import OK

DEFAULT_TEMPLATE = PromptTemplate()  # sentiment: "Review: {text}\nSentiment:" -> negative / positive


@dataclass
class CausalResult:
    """What one causal-LM training run measured."""

    train_loss: float
    train_seconds: float  # wall time of training, the evaluation after each epoch included
    step_seconds: float  # median seconds per optimizer step
    steps: int
    eval: dict[str, float] = field(default_factory=dict)
    output_dir: str | None = None
    tokens_per_second: float | None = None  # non-padding input tokens trained on per second of training
    model: Any = field(default=None, repr=False, compare=False)  # the trained PeftModel, for more evaluation


def train_causal(
    model: str | nn.Module,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]] | None = None,
    *,
    tokenizer: Any = None,
    output_dir: str | os.PathLike | None = None,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    lora_config: Any = None,
    quant: Any = None,
    gradient_checkpointing: bool = False,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    eval_batch_size: int = 32,
    callbacks: Sequence[Any] = (),
) -> CausalResult:
    """LoRA-train a causal LM (optionally on a k-bit base) to answer with the label word.

    ``model`` is an alias/folder/hub id (``tokenizer`` then loaded with it) or a model object
    with its ``tokenizer``. ``quant`` (a :class:`peftlab.quantization.QuantConfig`) quantizes
    the frozen base before the adapter is added (QLoRA). The adapter and tokenizer are saved
    to ``output_dir`` when given. ``callbacks`` are extra ``transformers.TrainerCallback`` objects
    (progress reporting, for example). With ``eval_rows``, exact match and perplexity are
    measured after every epoch; ``eval`` holds the last ones. A run that fails or diverges raises
    :class:`~peftlab.errors.WorkbenchError` with the reason.
    """
    from transformers import set_seed

    from peftlab import LoraConfig, TaskType, get_peft_model
    from peftlab.lab.callbacks import StepTimer, TrainSummary
    from peftlab.lab.runner import execute
    from peftlab.lab.setup import Prepared
    from peftlab.quantization import is_quantized_model, prepare_model_for_kbit_training, quantize_model

    set_seed(seed)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_causal_lm(os.fspath(model), quant)
    else:
        if tokenizer is None:
            raise PeftConfigError("train_causal: pass tokenizer= together with a model object.")
        if quant is not None:
            quantize_model(model, quant)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quant is not None or gradient_checkpointing or is_quantized_model(model):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora_config = lora_config or LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16)
    peft_model = get_peft_model(model, lora_config)
    peft_model.chunked_causal_loss = True  # training reads only the loss: no full-vocabulary logits
    # Gradient checkpointing, if asked, is already on (above); the Trainer must not enable it twice.
    train = TrainConfig(epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                        eval_batch_size=eval_batch_size, seed=seed, progress=False)
    run = RunConfig(name="train_causal", method=lora_config.peft_type.value.lower(), task="causal_lm",
                    data=DataConfig(max_length=max_length), train=train)
    prepared = Prepared.from_rows(run, peft_model, tokenizer, template, train_rows, eval_rows or [])
    steps, summary = StepTimer(), TrainSummary()
    with tempfile.TemporaryDirectory(prefix="peftlab-causal-") as scratch:
        record = execute(run, scratch, prepared=prepared, callbacks=[steps, summary, *callbacks])
    if record.status != OK:
        raise WorkbenchError(f"train_causal: training {record.status}: {record.error}")
    seconds = record.train_seconds or 0.0
    result = CausalResult(float(summary.train_loss), seconds, steps.median(), summary.steps)
    result.tokens_per_second = record.train_tokens / seconds if record.train_tokens and seconds > 0 else None
    if eval_rows:
        result.eval = {"accuracy": record.accuracy, "perplexity": record.perplexity}
    if output_dir is not None:
        peft_model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        result.output_dir = os.fspath(output_dir)
    result.model = peft_model
    return result

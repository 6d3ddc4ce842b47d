"""``AutoPeftModel*``: load base model + adapter from the adapter folder alone, as peft does.

The adapter's ``adapter_config.json`` names its base model (``base_model_name_or_path``); the
matching transformers ``AutoModelFor*`` class loads it (with the caller's keyword arguments, e.g.
``quantization_config``, ``torch_dtype``) and the adapter is loaded on top.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from peftlab.config import PeftConfig, TaskType
from peftlab.errors import CheckpointError, PeftConfigError
from peftlab.peft_model import PeftModel, task_model_class

# transformers Auto class used for each task type when the caller does not fix one.
_AUTO_CLASS_FOR_TASK = {
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}
# from_pretrained keywords that belong to the adapter, not to the base model's loader.
_ADAPTER_KWARGS = ("adapter_name", "is_trainable", "config", "allow_pickle", "torch_device", "autocast_adapter_dtype",
                   "low_cpu_mem_usage")


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(adapter_dir)``: the base model class follows the config's task type."""

    task_type: ClassVar[TaskType | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_path).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None,
                        subfolder: str | None = None, **kwargs: Any) -> PeftModel:
        """Load the base model named in the adapter config, then the adapter; returns a ``PeftModelFor*``."""
        import transformers

        config = PeftConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
        base_name = config.base_model_name_or_path
        if not base_name:
            raise CheckpointError(
                f"{os.fspath(pretrained_model_name_or_path)}/adapter_config.json names no base_model_name_or_path; "
                f"load the base model yourself and use PeftModel.from_pretrained(base_model, adapter_path)."
            )
        task = cls.task_type or config.task_type
        if cls.task_type is not None and config.task_type is not None and TaskType(config.task_type) != cls.task_type:
            raise PeftConfigError(
                f"this adapter was trained for task_type {TaskType(config.task_type).value}, not {cls.task_type.value}; "
                f"load it with AutoPeftModel or {_auto_peft_name(TaskType(config.task_type))}."
            )
        if task is None:
            raise PeftConfigError(
                "the adapter config has no task_type, so the base model class is unknown; load the base model yourself "
                "and use PeftModel.from_pretrained(base_model, adapter_path)."
            )
        adapter_kwargs = {k: kwargs.pop(k) for k in _ADAPTER_KWARGS if k in kwargs}
        auto_class = getattr(transformers, _AUTO_CLASS_FOR_TASK[TaskType(task)])
        base = auto_class.from_pretrained(base_name, revision=config.revision or "main", **kwargs)
        return task_model_class(task).from_pretrained(
            base, pretrained_model_name_or_path, subfolder=subfolder, revision=revision, **adapter_kwargs
        )


def _auto_peft_name(task: TaskType) -> str:
    return next((c.__name__ for c in AUTO_PEFT_CLASSES if c.task_type == task), "AutoPeftModel")


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = TaskType.CAUSAL_LM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = TaskType.FEATURE_EXTRACTION


AUTO_PEFT_CLASSES = (
    AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering, AutoPeftModelForFeatureExtraction,
)

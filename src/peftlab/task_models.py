"""``PeftModelFor*``: peft's task-specific class names for a :class:`~peftlab.model.PeftModel`.

peftlab's ``PeftModel`` already serves every task (the forward is the base model's own), so each
class only names the task: ``get_peft_model`` and ``PeftModel.from_pretrained`` return the class
matching ``config.task_type`` as peft does, and code that checks ``isinstance(m,
PeftModelForCausalLM)`` or builds ``PeftModelForCausalLM(model, config)`` keeps working.
"""

from __future__ import annotations

from peftlab.config import TaskType
from peftlab.model import PeftModel


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel for ``TaskType.SEQ_CLS`` (the classifier head is trained and saved)."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel for ``TaskType.TOKEN_CLS`` (the classifier head is trained and saved)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel for ``TaskType.QUESTION_ANS`` (``qa_outputs`` is trained and saved)."""


class PeftModelForCausalLM(PeftModel):
    """A PeftModel for ``TaskType.CAUSAL_LM``."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel for ``TaskType.SEQ_2_SEQ_LM``."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel for ``TaskType.FEATURE_EXTRACTION``."""


TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def task_model_class(task_type: TaskType | str | None) -> type[PeftModel]:
    """The ``PeftModelFor*`` class for ``task_type``; plain ``PeftModel`` when there is none."""
    return TASK_MODEL_CLASSES.get(TaskType(task_type), PeftModel) if task_type is not None else PeftModel

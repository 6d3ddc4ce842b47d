"""peftlab: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The public API mirrors Hugging Face peft's names, so switching is a change of import.
"""

import importlib
from typing import TYPE_CHECKING, Any

from peftlab.errors import (
    AdapterStateError,
    CheckpointError,
    ModelNotFoundError,
    NoMatchingPeftModuleError,
    PeftConfigError,
    PeftError,
    PeftlabError,
    QuantizationError,
    TargetModuleError,
)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from peftlab.config import PeftConfig
    from peftlab.config import PeftType
    from peftlab.config import TaskType
    from peftlab.methods.adalora.adalora import AdaLoraConfig
    from peftlab.methods.adalora.budget import orthogonal_regularization
    from peftlab.methods.adalora.budget import update_and_allocate
    from peftlab.methods.bottleneck.bottleneck import BottleneckConfig
    from peftlab.methods.ia3.ia3 import IA3Config
    from peftlab.methods.lycoris.loha import LoHaConfig
    from peftlab.methods.lycoris.lokr import LoKrConfig
    from peftlab.methods.lora.lora import LoraConfig
    from peftlab.methods.prompt.p_tuning import PromptEncoderConfig
    from peftlab.methods.prompt.p_tuning import PromptEncoderReparameterizationType
    from peftlab.methods.prompt.prefix_tuning import PrefixTuningConfig
    from peftlab.methods.prompt.prompt_tuning import PromptTuningConfig
    from peftlab.methods.prompt.prompt_tuning import PromptTuningInit
    from peftlab.methods.selective.selective import SelectiveConfig
    from peftlab.methods.trainable_tokens.trainable_tokens import TrainableTokensConfig
    from peftlab.methods.vera.vera import VeraConfig
    from peftlab.methods.oft.oft import OFTConfig
    from peftlab.peft_model import PeftModel
    from peftlab.peft_model import get_peft_model
    from peftlab.peft_model import get_peft_model_state_dict
    from peftlab.peft_model import set_peft_model_state_dict
    from peftlab.quantization import QuantConfig
    from peftlab.quantization import prepare_model_for_kbit_training
    from peftlab.quantization import quantize_model
    from peftlab.methods.adalora.callback import AdaLoraCallback
    from peftlab.peft_model import PeftModelForCausalLM
    from peftlab.peft_model import PeftModelForFeatureExtraction
    from peftlab.peft_model import PeftModelForQuestionAnswering
    from peftlab.peft_model import PeftModelForSeq2SeqLM
    from peftlab.peft_model import PeftModelForSequenceClassification
    from peftlab.peft_model import PeftModelForTokenClassification
    from peftlab.auto import AutoPeftModel
    from peftlab.auto import AutoPeftModelForCausalLM
    from peftlab.auto import AutoPeftModelForFeatureExtraction
    from peftlab.auto import AutoPeftModelForQuestionAnswering
    from peftlab.auto import AutoPeftModelForSeq2SeqLM
    from peftlab.auto import AutoPeftModelForSequenceClassification
    from peftlab.auto import AutoPeftModelForTokenClassification
    from peftlab.mapping import get_peft_config
    from peftlab.merge_utils import dare_linear
    from peftlab.merge_utils import dare_ties
    from peftlab.merge_utils import magnitude_prune
    from peftlab.merge_utils import task_arithmetic
    from peftlab.merge_utils import ties
    from peftlab.mapping import inject_adapter_in_model
    from peftlab.mapping import load_peft_weights
    from peftlab.model_status import TunerLayerStatus
    from peftlab.model_status import TunerModelStatus
    from peftlab.model_status import get_layer_status
    from peftlab.model_status import get_model_status
    from peftlab.methods.prompt.base import PromptLearningConfig
    from peftlab.methods.prompt.p_tuning import PromptEncoder
    from peftlab.methods.prompt.prefix_tuning import PrefixEncoder
    from peftlab.methods.prompt.prompt_tuning import PromptEmbedding
    from peftlab.peft_names import AdaLoraModel
    from peftlab.peft_names import IA3Model
    from peftlab.peft_names import LoHaModel
    from peftlab.peft_names import LoKrModel
    from peftlab.peft_names import LoraModel
    from peftlab.peft_names import OFTModel
    from peftlab.peft_names import TrainableTokensModel
    from peftlab.peft_names import VeraModel
    from peftlab.peft_names import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peftlab.peft_names import PEFT_TYPE_TO_CONFIG_MAPPING
    from peftlab.peft_names import PEFT_TYPE_TO_TUNER_MAPPING
    from peftlab.peft_names import PeftMixedModel
    from peftlab.peft_names import PeftWarning
    from peftlab.peft_names import cast_mixed_precision_params
    from peftlab.peft_names import get_base_model_state_dict
    from peftlab.peft_names import set_base_model_state_dict
    from peftlab.peft_names import shift_tokens_right

# public name -> module that defines it. Importing peftlab imports neither torch nor transformers
# (`peftlab --help` answers at once); each name loads its module on first use (PEP 562).
_LAZY: dict[str, str] = {
    "PromptLearningConfig": "peftlab.methods.prompt.base",
    "PromptEncoder": "peftlab.methods.prompt.p_tuning",
    "PrefixEncoder": "peftlab.methods.prompt.prefix_tuning",
    "PromptEmbedding": "peftlab.methods.prompt.prompt_tuning",
    "AdaLoraModel": "peftlab.peft_names",
    "IA3Model": "peftlab.peft_names",
    "LoHaModel": "peftlab.peft_names",
    "LoKrModel": "peftlab.peft_names",
    "LoraModel": "peftlab.peft_names",
    "OFTModel": "peftlab.peft_names",
    "TrainableTokensModel": "peftlab.peft_names",
    "VeraModel": "peftlab.peft_names",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "peftlab.peft_names",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "peftlab.peft_names",
    "PEFT_TYPE_TO_TUNER_MAPPING": "peftlab.peft_names",
    "PeftMixedModel": "peftlab.peft_names",
    "PeftWarning": "peftlab.peft_names",
    "cast_mixed_precision_params": "peftlab.peft_names",
    "get_base_model_state_dict": "peftlab.peft_names",
    "set_base_model_state_dict": "peftlab.peft_names",
    "shift_tokens_right": "peftlab.peft_names",
    "PeftConfig": "peftlab.config",
    "PeftType": "peftlab.config",
    "TaskType": "peftlab.config",
    "AdaLoraConfig": "peftlab.methods.adalora.adalora",
    "orthogonal_regularization": "peftlab.methods.adalora.budget",
    "update_and_allocate": "peftlab.methods.adalora.budget",
    "BottleneckConfig": "peftlab.methods.bottleneck.bottleneck",
    "IA3Config": "peftlab.methods.ia3.ia3",
    "LoHaConfig": "peftlab.methods.lycoris.loha",
    "LoKrConfig": "peftlab.methods.lycoris.lokr",
    "LoraConfig": "peftlab.methods.lora.lora",
    "PromptEncoderConfig": "peftlab.methods.prompt.p_tuning",
    "PromptEncoderReparameterizationType": "peftlab.methods.prompt.p_tuning",
    "PrefixTuningConfig": "peftlab.methods.prompt.prefix_tuning",
    "PromptTuningConfig": "peftlab.methods.prompt.prompt_tuning",
    "PromptTuningInit": "peftlab.methods.prompt.prompt_tuning",
    "SelectiveConfig": "peftlab.methods.selective.selective",
    "TrainableTokensConfig": "peftlab.methods.trainable_tokens.trainable_tokens",
    "VeraConfig": "peftlab.methods.vera.vera",
    "OFTConfig": "peftlab.methods.oft.oft",
    "PeftModel": "peftlab.peft_model",
    "get_peft_model": "peftlab.peft_model",
    "get_peft_model_state_dict": "peftlab.peft_model",
    "set_peft_model_state_dict": "peftlab.peft_model",
    "QuantConfig": "peftlab.quantization",
    "prepare_model_for_kbit_training": "peftlab.quantization",
    "quantize_model": "peftlab.quantization",
    "PeftModelForCausalLM": "peftlab.peft_model",
    "PeftModelForFeatureExtraction": "peftlab.peft_model",
    "PeftModelForQuestionAnswering": "peftlab.peft_model",
    "PeftModelForSeq2SeqLM": "peftlab.peft_model",
    "PeftModelForSequenceClassification": "peftlab.peft_model",
    "PeftModelForTokenClassification": "peftlab.peft_model",
    "AutoPeftModel": "peftlab.auto",
    "AutoPeftModelForCausalLM": "peftlab.auto",
    "AutoPeftModelForFeatureExtraction": "peftlab.auto",
    "AutoPeftModelForQuestionAnswering": "peftlab.auto",
    "AutoPeftModelForSeq2SeqLM": "peftlab.auto",
    "AutoPeftModelForSequenceClassification": "peftlab.auto",
    "AutoPeftModelForTokenClassification": "peftlab.auto",
    "get_peft_config": "peftlab.mapping",
    "dare_linear": "peftlab.merge_utils",
    "dare_ties": "peftlab.merge_utils",
    "magnitude_prune": "peftlab.merge_utils",
    "task_arithmetic": "peftlab.merge_utils",
    "ties": "peftlab.merge_utils",
    "inject_adapter_in_model": "peftlab.mapping",
    "load_peft_weights": "peftlab.mapping",
    "TunerLayerStatus": "peftlab.model_status",
    "TunerModelStatus": "peftlab.model_status",
    "get_layer_status": "peftlab.model_status",
    "get_model_status": "peftlab.model_status",
    "AdaLoraCallback": "peftlab.methods.adalora.callback",  # imports transformers' Trainer machinery
}

__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "task_arithmetic",
    "ties",
    "inject_adapter_in_model",
    "load_peft_weights",
    "AdaLoraConfig",
    "AdapterStateError",
    "BottleneckConfig",
    "CheckpointError",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "ModelNotFoundError",
    "PeftConfig",
    "PeftConfigError",
    "PeftModel",
    "PeftType",
    "PeftlabError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SelectiveConfig",
    "TrainableTokensConfig",
    "VeraConfig",
    "OFTConfig",
    "QuantConfig",
    "QuantizationError",
    "TargetModuleError",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "orthogonal_regularization",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_peft_model_state_dict",
    "update_and_allocate",
    "AdaLoraModel",
    "IA3Model",
    "LoHaModel",
    "LoKrModel",
    "LoraModel",
    "OFTModel",
    "TrainableTokensModel",
    "VeraModel",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftMixedModel",
    "PeftWarning",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "shift_tokens_right",
    "PromptLearningConfig",
    "PromptEncoder",
    "PrefixEncoder",
    "PromptEmbedding",
    "NoMatchingPeftModuleError",
    "PeftError",
]


# Subpackages reachable as attributes without their own import (``peftlab.integrations.enable_trainer_support()``).
_SUBPACKAGES = frozenset({"integrations"})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"peftlab.{name}")
    module = _LAZY.get(name)
    if module is None:
        from peftlab.unsupported import refusal, refusal_error

        raise refusal_error(refusal(name) or f"module 'peftlab' has no attribute {name!r}", name)
    # Not cached in the module's globals: an imported module is a dict lookup away, and nothing
    # stale survives importlib.reload(peftlab).
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

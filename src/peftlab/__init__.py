"""peftlab: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The public API mirrors Hugging Face peft's names, so switching is a change of import.
"""

from typing import Any

from peftlab.config import PeftConfig, PeftType, TaskType
from peftlab.errors import (
    AdapterStateError,
    CheckpointError,
    ModelNotFoundError,
    PeftConfigError,
    PeftlabError,
    QuantizationError,
    TargetModuleError,
)
from peftlab.methods.adalora import AdaLoraConfig
from peftlab.methods.adalora_budget import orthogonal_regularization, update_and_allocate
from peftlab.methods.bottleneck import BottleneckConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.loha import LoHaConfig
from peftlab.methods.lokr import LoKrConfig
from peftlab.methods.lora import LoraConfig
from peftlab.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftlab.methods.prefix_tuning import PrefixTuningConfig
from peftlab.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from peftlab.methods.selective import SelectiveConfig
from peftlab.peft_model import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftlab.quantization import QuantConfig, prepare_model_for_kbit_training, quantize_model

__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
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
]


def __getattr__(name: str) -> Any:
    # The Trainer callback imports transformers' Trainer machinery: load it only when asked for.
    if name == "AdaLoraCallback":
        from peftlab.adalora_callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")

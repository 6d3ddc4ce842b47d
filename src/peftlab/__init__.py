"""peftlab: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The public API mirrors Hugging Face peft's names, so switching is a change of import.
"""

from peftlab.config import PeftConfig, PeftType, TaskType
from peftlab.errors import AdapterStateError, CheckpointError, PeftConfigError, PeftlabError, TargetModuleError
from peftlab.errors import ModelNotFoundError, QuantizationError
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.loha import LoHaConfig
from peftlab.methods.lokr import LoKrConfig
from peftlab.methods.lora import LoraConfig
from peftlab.model import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftlab.quantization import QuantConfig, prepare_model_for_kbit_training, quantize_model

__version__ = "0.1.0"

__all__ = [
    "AdapterStateError",
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
    "QuantConfig",
    "QuantizationError",
    "TargetModuleError",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "set_peft_model_state_dict",
]

"""The prompt-learning methods: prompt tuning, prefix tuning and P-tuning.

They change no layer; they learn virtual tokens put in front of the input. ``base.py`` holds what
the three share (:class:`PromptLearningConfig`, the :class:`VirtualTokens` module, resolving
model-dependent defaults); ``inputs.py`` the pure functions that rewrite a batch (embeddings for
prompt tuning and P-tuning, a key/value prefix for prefix tuning) and the two token kinds built on
them; each method module adds its config, its encoder and its registration.
"""

from peftlab.methods.prompt.base import PromptLearningConfig, VirtualTokens
from peftlab.methods.prompt.inputs import EmbeddingTokens, PrefixTokens
from peftlab.methods.prompt.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from peftlab.methods.prompt.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peftlab.methods.prompt.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__all__ = [
    "EmbeddingTokens",
    "PrefixEncoder",
    "PrefixTokens",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "VirtualTokens",
]

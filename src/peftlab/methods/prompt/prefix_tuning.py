"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190).

Every attention layer attends to ``n`` extra learned key/value positions in front of the real
ones: a table of rows (n, num_layers * 2 * token_dim) is split into each layer's keys and values.
With ``prefix_projection`` the rows are reparameterized while training as
``Linear(tanh(Linear(E)))`` of a smaller (n, token_dim) table ``E``; only the rows are saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftlab import limits
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError
from peftlab.methods.prompt.inputs import PrefixTokens
from peftlab.methods.prompt.base import PromptLearningConfig, cache_argument, resolve_prompt_config
from peftlab.registry import MethodSpec, register


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings (see :class:`PromptLearningConfig` for the shared ones).

    Args:
        init_weights: None draws the rows at random; "zero" starts them at zero.
        encoder_hidden_size: hidden width of the projection; None uses token_dim.
        prefix_projection: reparameterize the rows with a two-layer MLP while training.
    """

    peft_type = PeftType.PREFIX_TUNING

    init_weights: Literal["zero"] | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise PeftConfigError(f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}.")
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise PeftConfigError(f"PrefixTuningConfig: encoder_hidden_size must be a positive integer or None, got {hidden!r}.")
        if not isinstance(self.prefix_projection, bool):
            raise PeftConfigError(f"PrefixTuningConfig: prefix_projection must be True or False, got {self.prefix_projection!r}.")


class PrefixEncoder(PrefixTokens):
    """Rows (n, num_layers * 2 * token_dim): ``embedding.weight`` itself, or ``transform(embedding.weight)``.

    Submodule names (``embedding``, ``transform``) follow peft's, so weights copy across.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config)
        n, dim = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * dim
        hidden = config.encoder_hidden_size or dim
        limits.check_allocation("PrefixTuningConfig", "the prefix table", (n, width))
        limits.check_allocation("PrefixTuningConfig", "the projection", (hidden, width))
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def has_encoder(self) -> bool:
        return self.transform is not None

    def encode(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)

    def drop_encoder(self) -> None:
        self.transform = None


def resolve_prefix_config(config: PrefixTuningConfig, model: nn.Module) -> PrefixTuningConfig:
    """Shared defaults, then keys/values sized for grouped-query attention (as peft does)."""
    config = resolve_prompt_config(config, model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = getattr(text, "num_key_value_heads", None)
    if isinstance(kv_heads, int):
        head_dim = getattr(text, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if config.token_dim % config.num_attention_heads:
        raise PeftConfigError(
            f"PrefixTuningConfig: token_dim={config.token_dim} is not divisible by num_attention_heads="
            f"{config.num_attention_heads}; set both to the model's key/value width and head count."
        )
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if cache_argument(model) is None:
        raise PeftConfigError(
            f"PrefixTuningConfig: {type(model).__name__} does not take a key/value cache (past_key_values), which prefix tuning needs; "
            f"use PromptTuningConfig or PromptEncoderConfig for this model."
        )
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise PeftConfigError("PrefixTuningConfig does not work with gradient checkpointing; disable it first.")
    return config


def make_prefix_encoder(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    return PrefixEncoder(config).to(model.get_input_embeddings().weight.device)


register(MethodSpec(PrefixTuningConfig, resolve_config=resolve_prefix_config, make_model_adapter=make_prefix_encoder, run_defaults={"num_virtual_tokens": 20},
                    learning_rates=(3e-3, 1e-2, 3e-2)))

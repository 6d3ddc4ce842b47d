"""P-tuning (Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Like prompt tuning, the model reads ``[P ; embed(x)]``, but the prompt is reparameterized while
training: ``P = MLP(E)`` or ``P = MLP(BiLSTM(E))`` with ``E`` a learned (n, token_dim) table. The
encoder couples the virtual tokens and makes optimization steadier. Only ``P`` is saved.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import limits
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError
from peftlab.methods.prompt.inputs import EmbeddingTokens
from peftlab.methods.prompt.base import PromptLearningConfig, resolve_embedding_prompt_config
from peftlab.registry import MethodSpec, register


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning settings (see :class:`PromptLearningConfig` for the shared ones).

    Args:
        encoder_reparameterization_type: "MLP" (three linear layers with ReLU) or "LSTM" (a
            bidirectional LSTM followed by a two-layer MLP).
        encoder_hidden_size: hidden width of the encoder; None uses token_dim.
        encoder_num_layers: LSTM layers (the MLP always has peft's fixed depth).
        encoder_dropout: dropout between LSTM layers.
    """

    peft_type = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(self.encoder_reparameterization_type)
        except ValueError:
            raise PeftConfigError(
                f"PromptEncoderConfig: encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not "
                f"known; use 'MLP' or 'LSTM'."
            ) from None
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise PeftConfigError(f"PromptEncoderConfig: encoder_hidden_size must be a positive integer or None, got {hidden!r}.")
        if isinstance(self.encoder_num_layers, bool) or not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise PeftConfigError(f"PromptEncoderConfig: encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}.")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise PeftConfigError(f"PromptEncoderConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")


class PromptEncoder(EmbeddingTokens):
    """``embedding`` (n * submodules, token_dim) -> encoder -> rows (n * submodules, token_dim).

    Submodule names (``embedding``, ``lstm_head``, ``mlp_head``) follow peft's, so weights copy across.
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__(config)
        dim = config.token_dim
        hidden = config.encoder_hidden_size or dim
        total = config.num_virtual_tokens * config.num_transformer_submodules
        limits.check_allocation("PromptEncoderConfig", "the prompt table", (total, dim))
        limits.check_allocation("PromptEncoderConfig", "the encoder", (8 * config.encoder_num_layers * hidden, hidden + dim))
        self.embedding = nn.Embedding(total, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return  # saved rows are loaded straight into ``embedding``
        if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("PromptEncoderConfig: encoder_num_layers is ignored for the MLP encoder (it has 3 layers).", stacklevel=3)
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    @property
    def has_encoder(self) -> bool:
        return self.mlp_head is not None

    def encode(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, total, dim): the LSTM reads the tokens as one sequence
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def drop_encoder(self) -> None:
        self.lstm_head = None
        self.mlp_head = None


def resolve_p_tuning_config(config: PromptEncoderConfig, model: nn.Module) -> PromptEncoderConfig:
    config = resolve_embedding_prompt_config(config, model)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config


def make_prompt_encoder(model: nn.Module, config: PromptEncoderConfig) -> PromptEncoder:
    return PromptEncoder(config).to(model.get_input_embeddings().weight.device)


register(MethodSpec(PromptEncoderConfig, resolve_config=resolve_p_tuning_config, make_model_adapter=make_prompt_encoder, run_defaults={"num_virtual_tokens": 20},
                    learning_rates=(1e-3, 3e-3, 1e-2)))

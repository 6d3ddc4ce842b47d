"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

The model reads ``[P ; embed(x)]`` where ``P`` (num_virtual_tokens, token_dim) is a learned table
of soft token embeddings; the model's own weights stay frozen. ``P`` starts as random vectors,
as the embeddings of a text (e.g. the task description) or of random vocabulary tokens.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import limits
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError
from peftlab.methods.prompt.inputs import EmbeddingTokens
from peftlab.methods.prompt.base import PromptLearningConfig, resolve_embedding_prompt_config
from peftlab.registry import MethodSpec, register


class PromptTuningInit(str, enum.Enum):
    """How the prompt table starts (peft's names)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings (see :class:`PromptLearningConfig` for the shared ones).

    Args:
        prompt_tuning_init: RANDOM (normal vectors), TEXT (embeddings of ``prompt_tuning_init_text``,
            repeated or cut to num_virtual_tokens) or SAMPLE_VOCAB (embeddings of random tokens).
        prompt_tuning_init_text: the text for TEXT init.
        tokenizer_name_or_path: tokenizer (local folder or hub id) that turns the text into tokens.
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` (TEXT only;
            ``trust_remote_code`` is refused).
    """

    peft_type = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise PeftConfigError(
                f"PromptTuningConfig: prompt_tuning_init={self.prompt_tuning_init!r} is not known; "
                f"use one of {[i.value for i in PromptTuningInit]}."
            ) from None
        text_init = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text_init and not self.tokenizer_name_or_path:
            raise PeftConfigError(
                "PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer of the base "
                "model) to turn prompt_tuning_init_text into tokens."
            )
        if text_init and not self.prompt_tuning_init_text:
            raise PeftConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        if self.tokenizer_kwargs and not text_init:
            raise PeftConfigError("PromptTuningConfig: tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")
        if self.tokenizer_kwargs and self.tokenizer_kwargs.get("trust_remote_code"):
            raise PeftConfigError("PromptTuningConfig: tokenizer_kwargs may not enable trust_remote_code.")


def text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """Token ids of the init text, repeated or cut to ``total`` (peft's rule)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as exc:  # missing folder, offline hub: one clear message
        raise PeftConfigError(
            f"PromptTuningConfig: could not load tokenizer {config.tokenizer_name_or_path!r} for TEXT init "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give a local tokenizer folder."
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise PeftConfigError("PromptTuningConfig: prompt_tuning_init_text gives no tokens; use a non-empty text.")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(EmbeddingTokens):
    """The learned prompt table. ``embedding.weight``: (num_virtual_tokens * submodules, token_dim)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        limits.check_allocation("PromptTuningConfig", "the prompt table", (total, config.token_dim))
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return  # loaded weights follow, or nn.Embedding's N(0, 1) init
        device = word_embeddings.weight.device
        if config.prompt_tuning_init == PromptTuningInit.TEXT:
            ids = torch.tensor(text_token_ids(config, total), dtype=torch.long, device=device)
        else:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), device=device)
        vocab = word_embeddings.num_embeddings
        if int(ids.max()) >= vocab:
            raise PeftConfigError(
                f"PromptTuningConfig: the tokenizer {config.tokenizer_name_or_path!r} gives token id {int(ids.max())} but "
                f"the model has only {vocab} embeddings; use the base model's own tokenizer."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids).detach().float())


def make_prompt_embedding(model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
    word_embeddings = model.get_input_embeddings()
    module = PromptEmbedding(config, word_embeddings)
    return module.to(word_embeddings.weight.device)


register(MethodSpec(PromptTuningConfig, resolve_config=resolve_embedding_prompt_config, make_model_adapter=make_prompt_embedding, run_defaults={"num_virtual_tokens": 20},
                    learning_rates=(1e-2, 3e-2, 1e-1)))

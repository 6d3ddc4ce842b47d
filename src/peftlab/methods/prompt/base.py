"""What the prompt-learning methods (prompt tuning, P-tuning, prefix tuning) share.

These methods leave every layer of the model alone. They learn a few *virtual tokens*: rows that
are put in front of the real input, either as input embeddings (prompt tuning, P-tuning) or as
attention keys/values in every layer (prefix tuning). :class:`PromptLearningConfig` holds the
fields peft's config of the same name has; :class:`VirtualTokens` is the model-level adapter
module that :class:`~peftlab.peft_model.PeftModel` keeps in ``prompt_encoder[adapter_name]``.

On disk, all three save one tensor, ``prompt_embeddings``: the rows the model actually sees
(after any encoder), as peft does. A loaded adapter therefore holds a plain table of rows; the
encoder (P-tuning's MLP/LSTM, prefix tuning's projection) exists only while training from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.config import PeftConfig, TaskType
from peftlab.errors import CheckpointError, PeftConfigError

PROMPT_KEY = "prompt_embeddings"
SUPPORTED_TASKS = (TaskType.SEQ_CLS, TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (names and defaults as in peft).

    The model-shape fields are filled from the model's config when left as None.

    Args:
        num_virtual_tokens: how many virtual tokens to learn (required, > 0).
        token_dim: hidden size of the model's token embeddings.
        num_transformer_submodules: 2 for encoder-decoder models (SEQ_2_SEQ_LM), else 1.
        num_attention_heads: attention heads (prefix tuning: key/value heads).
        num_layers: transformer blocks (prefix tuning gives each one its own keys/values).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise PeftConfigError(f"{name}: num_virtual_tokens must be a positive integer (e.g. 20), got {n!r}.")
        for field_name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise PeftConfigError(f"{name}: {field_name} must be a positive integer or None, got {value!r}.")
        if self.task_type not in SUPPORTED_TASKS:
            raise PeftConfigError(
                f"{name}: task_type={getattr(self.task_type, 'value', self.task_type)!r} is not supported by prompt "
                f"methods; use one of {[t.value for t in SUPPORTED_TASKS]}."
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _model_config(model: nn.Module, method: str) -> Any:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_input_embeddings", None)):
        raise PeftConfigError(
            f"{method} needs a Hugging Face transformers model (with .config and get_input_embeddings()); "
            f"got {type(model).__name__}. Use a layer method such as LoraConfig for plain nn.Modules."
        )
    return config


def _first_attr(config: Any, names: tuple[str, ...], what: str, method: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise PeftConfigError(f"{method}: cannot read {what} from the model config; set it in the config explicitly.")


def forward_accepts(model: nn.Module, argument: str) -> bool:
    """True when the model's forward (or its backbone's, reached through **kwargs) names ``argument``."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    for module in (model, backbone):
        if isinstance(module, nn.Module) and argument in inspect.signature(module.forward).parameters:
            return True
    return False


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 renamed past_key_values to cache
_CACHE_ARGUMENT_OF: dict[type, str | None] = {}


def cache_argument(model: nn.Module) -> str | None:
    """The name under which this model's forward takes a key/value cache, or None if it takes none.

    Asked on every prefix-tuning forward; reading signatures takes ~0.1 ms, so the answer is kept
    per model class (a class's forward signature does not change).
    """
    kind = type(model)
    if kind not in _CACHE_ARGUMENT_OF:
        _CACHE_ARGUMENT_OF[kind] = next((name for name in CACHE_ARGUMENTS if forward_accepts(model, name)), None)
    return _CACHE_ARGUMENT_OF[kind]


def resolve_prompt_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """Fill the model-shape fields from the model's config, as peft does (config is a copy)."""
    method = type(config).__name__
    model_config = _model_config(model, method)
    is_seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
    if config.task_type == TaskType.SEQ_2_SEQ_LM and not is_seq2seq:
        raise PeftConfigError(f"{method}: task_type SEQ_2_SEQ_LM needs an encoder-decoder model, got {type(model).__name__}.")
    if config.task_type == TaskType.CAUSAL_LM and is_seq2seq:
        raise PeftConfigError(f"{method}: {type(model).__name__} is an encoder-decoder model; use task_type SEQ_2_SEQ_LM.")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if config.num_layers is None:
        config.num_layers = _first_attr(text, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers", method)
    if config.token_dim is None:
        config.token_dim = _first_attr(text, ("hidden_size", "n_embd", "d_model"), "token_dim", method)
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_attr(
            text, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads", method
        )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    return config


def resolve_embedding_prompt_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """:func:`resolve_prompt_config` for methods that feed rows as input embeddings."""
    config = resolve_prompt_config(config, model)
    if not forward_accepts(model, "inputs_embeds"):
        raise PeftConfigError(
            f"{type(config).__name__}: {type(model).__name__}.forward takes no inputs_embeds, so virtual tokens "
            f"cannot be put in front of its input; use a layer method such as LoraConfig for this model."
        )
    return config


class VirtualTokens(nn.Module):
    """Base of the model-level prompt adapters: produces the rows put in front of the input.

    ``rows()`` has shape (num_virtual_tokens * num_transformer_submodules, width), where width is
    ``token_dim`` for input-embedding methods and ``num_layers * 2 * token_dim`` for prefix tuning.
    Subclasses set ``embedding`` (an ``nn.Embedding`` named as in peft, so weights copy across) and
    override :meth:`encode` when an encoder reparameterizes it.
    """

    def __init__(self, config: PromptLearningConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding: nn.Embedding

    def encode(self) -> torch.Tensor:
        """Rows computed from the trainable parameters (identity when there is no encoder)."""
        return self.embedding.weight

    @property
    def has_encoder(self) -> bool:
        return False

    def rows(self) -> torch.Tensor:
        return self.encode() if self.has_encoder else self.embedding.weight

    # ----- checkpoint hooks --------------------------------------------------------------------
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What goes on disk: the rows the model sees, encoder applied (peft's ``prompt_embeddings``)."""
        with torch.no_grad():
            return {PROMPT_KEY: self.rows().detach()}

    def expected_shape(self) -> tuple[int, int]:
        return tuple(self.rows().shape)  # type: ignore[return-value]

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved rows; an encoder is dropped, as saved rows cannot be turned back into its inputs."""
        table = tensors[PROMPT_KEY]
        if tuple(table.shape) != self.expected_shape():
            raise CheckpointError(
                f"{PROMPT_KEY} has shape {tuple(table.shape)} but this {type(self.config).__name__} expects "
                f"{self.expected_shape()}; the adapter was saved for another model or num_virtual_tokens."
            )
        weight = self.embedding.weight
        if self.has_encoder:
            self.drop_encoder()
            self.embedding = nn.Embedding(*table.shape, device=weight.device, dtype=weight.dtype)
            self.embedding.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            self.embedding.weight.copy_(table.to(device=self.embedding.weight.device, dtype=self.embedding.weight.dtype))

    def drop_encoder(self) -> None:
        """Remove the reparameterization (subclasses with an encoder override)."""

    # ----- input hooks (called by the prompt tuner's forward / generate) -----------------------
    def forward_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's forward inputs with the virtual tokens in (see :mod:`.inputs`)."""
        raise NotImplementedError

    def generate_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's generate inputs, starting from the virtual tokens."""
        raise NotImplementedError

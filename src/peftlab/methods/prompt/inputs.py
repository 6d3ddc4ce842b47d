"""Input rewriting for the prompt methods: put the virtual tokens in front of a batch.

Pure functions of (base model, adapter rows, config, keyword arguments) -> keyword arguments for
the base model's ``forward`` or ``generate``. Two kinds:

* embeddings (prompt tuning, P-tuning): ``inputs_embeds = [prompt rows ; embed(input_ids)]``, the
  attention mask gets ``n`` leading ones, causal-LM labels get ``n`` leading -100 (no loss on
  virtual positions). Causal-LM logits therefore have ``n`` extra leading positions, as in peft.
* prefix (prefix tuning): the rows become a key/value cache of length ``n`` in every layer
  (``DynamicCache``; ``EncoderDecoderCache`` with the prefix on the decoder's self-attention for
  seq2seq), the attention mask gets ``n`` leading ones and explicit position ids move by ``n``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peftlab.config import TaskType
from peftlab.errors import PeftConfigError
from peftlab.methods.prompt.base import CACHE_ARGUMENTS, PromptLearningConfig, VirtualTokens, cache_argument


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return int(value.shape[0])
    raise PeftConfigError("prompt methods need input_ids or inputs_embeds to know the batch size.")


def _with_leading(mask: torch.Tensor | None, n: int, value: float = 1) -> torch.Tensor | None:
    if mask is None:
        return None
    lead = torch.full((mask.shape[0], n), value, dtype=mask.dtype, device=mask.device)
    return torch.cat((lead, mask), dim=1)


def _drop(kwargs: dict[str, Any], key: str, why: str) -> None:
    if kwargs.get(key) is not None:
        warnings.warn(f"{key} is ignored with prompt methods: {why}.", stacklevel=4)
    kwargs.pop(key, None)


def prompt_embeddings(base_model: nn.Module, rows: torch.Tensor, config: PromptLearningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward inputs with the first ``n`` rows prepended to the (encoder's) input embeddings."""
    kwargs = dict(kwargs)
    n = config.num_virtual_tokens
    rows_b = batch_size(kwargs)
    kwargs["attention_mask"] = _with_leading(kwargs.get("attention_mask"), n)
    _drop(kwargs, "position_ids", "virtual tokens take the first positions")
    if config.task_type == TaskType.SEQ_CLS:
        kwargs["token_type_ids"] = _with_leading(kwargs.get("token_type_ids"), n, 0)
    elif config.task_type == TaskType.CAUSAL_LM:
        _drop(kwargs, "token_type_ids", "virtual tokens have no segment")
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = base_model.get_input_embeddings()(input_ids)
    prompts = rows[:n].unsqueeze(0).expand(rows_b, -1, -1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
    if config.task_type == TaskType.CAUSAL_LM and kwargs.get("labels") is not None:
        kwargs["labels"] = _with_leading(kwargs["labels"], n, -100)
    return kwargs


def prefix_cache(base_model: nn.Module, rows: torch.Tensor, config: PromptLearningConfig, batch: int) -> Any:
    """The prefix rows as a transformers cache holding ``n`` key/value positions per layer.

    rows: (n, num_layers * 2 * token_dim) -> per layer k, v: (batch, heads, n, token_dim / heads).
    """
    from transformers import DynamicCache, EncoderDecoderCache

    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    dtype = base_model.get_input_embeddings().weight.dtype
    kv = rows.to(dtype).unsqueeze(0).expand(batch, -1, -1).reshape(batch, n, layers * 2, heads, config.token_dim // heads)
    subs = config.num_transformer_submodules
    if subs == 2:
        # peft's layout for encoder-decoder models: the row blocks are doubled and read in groups
        # of four (self k, self v, cross k, cross v), so decoder layer i takes blocks 4i, 4i+1
        # (mod 2 * num_layers). Kept as is: it defines what a saved seq2seq prefix means.
        kv = torch.cat((kv, kv), dim=2)
    groups = kv.permute(2, 0, 3, 1, 4).split(2 * subs)  # per layer: (2 * subs, batch, heads, n, head_dim)
    cache = DynamicCache([(group[0], group[1]) for group in groups])
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        # The prefix joins the decoder's self-attention; cross-attention is computed from the encoder.
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


def prefix_inputs(base_model: nn.Module, rows: torch.Tensor, config: PromptLearningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward inputs with the prefix cache and masks extended over the ``n`` cached positions."""
    kwargs = dict(kwargs)
    n = config.num_virtual_tokens
    _refuse_cache(kwargs, "prefix tuning supplies past_key_values itself; do not pass them to forward().")
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        kwargs["decoder_attention_mask"] = _with_leading(kwargs.get("decoder_attention_mask"), n)
    else:
        kwargs["attention_mask"] = _with_leading(kwargs.get("attention_mask"), n)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    if config.task_type == TaskType.CAUSAL_LM:
        _drop(kwargs, "token_type_ids", "virtual tokens have no segment")
    kwargs[cache_argument(base_model) or "past_key_values"] = prefix_cache(base_model, rows, config, batch_size(kwargs))
    return kwargs


def generate_inputs(base_model: nn.Module, rows: torch.Tensor, config: PromptLearningConfig, prefix: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate`` keyword arguments that start from the virtual tokens.

    Decoder-only models get the real ``input_ids`` (so the output starts with them, as usual) plus
    either ``inputs_embeds`` covering [virtual ; real] tokens or a prefix cache; the attention mask
    covers the virtual positions, and generation continues from there with its own cache.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise PeftConfigError("generate() with a prompt method needs input_ids (and no inputs_embeds).")
    _refuse_cache(kwargs, "generate() with a prompt method starts its own cache; do not pass past_key_values.")
    n = config.num_virtual_tokens
    batch = int(input_ids.shape[0])
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if config.task_type == TaskType.SEQ_2_SEQ_LM and not prefix:
        return prompt_embeddings(base_model, rows, config, {**kwargs, "attention_mask": mask})
    if config.task_type != TaskType.SEQ_2_SEQ_LM:  # seq2seq: the prefix is on the decoder, the mask on the encoder
        kwargs["attention_mask"] = _with_leading(mask, n)
    if prefix:
        # generate() repeats every tensor input per beam / returned sequence, but not a cache object:
        # build the cache at the expanded batch size (all rows of the prefix are the same).
        cache = prefix_cache(base_model, rows, config, batch * _expand_size(base_model, kwargs))
        kwargs[cache_argument(base_model) or "past_key_values"] = cache
    else:
        embeds = base_model.get_input_embeddings()(input_ids)
        prompts = rows[:n].unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
    return kwargs


def _refuse_cache(kwargs: dict[str, Any], message: str) -> None:
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        raise PeftConfigError(message)


def _expand_size(base_model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many times generate() repeats each input row (transformers: max(num_beams, num_return_sequences))."""
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returned))


class EmbeddingTokens(VirtualTokens):
    """Virtual tokens put in front of the input embeddings (prompt tuning, P-tuning)."""

    def forward_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's forward inputs with the virtual tokens in front."""
        return prompt_embeddings(base_model, self.rows(), self.config, kwargs)

    def generate_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's generate inputs, starting from the virtual tokens."""
        return generate_inputs(base_model, self.rows(), self.config, False, kwargs)


class PrefixTokens(VirtualTokens):
    """Virtual tokens given to every layer as cached keys and values (prefix tuning)."""

    def forward_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's forward inputs with the prefix cache."""
        return prefix_inputs(base_model, self.rows(), self.config, kwargs)

    def generate_kwargs(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's generate inputs, starting from the prefix cache."""
        return generate_inputs(base_model, self.rows(), self.config, True, kwargs)

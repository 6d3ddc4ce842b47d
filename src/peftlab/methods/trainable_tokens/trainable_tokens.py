"""Trainable tokens: train a few rows of an embedding table (new or re-learned tokens), nothing else.

The adapter holds only the chosen rows, ``trainable_tokens_delta: (n, dim)``, which *replace* the
table's rows at ``token_indices`` (they start as copies of them, so the model is unchanged at
init). Replacing rather than adding keeps a resized vocabulary well defined: the saved rows are the
tokens' embeddings, whatever random values a fresh resize put there. Forward never copies the
table: the base lookup runs as usual and the positions holding a chosen token take the trained
row (``torch.where``); on a Linear (an output head tied to the embedding) the chosen output units
are computed from the trained rows (``index_copy`` on the last axis). A merge writes the rows into
the table; unmerge writes the original rows back.

When the output head shares the embedding's weight (GPT-2, tied Llama-style models), it gets a
view of the same trained rows, so input and output stay tied, as in peft.

Used two ways, with peft's names and files: the method ``TrainableTokensConfig`` (keys
``<embedding>.trainable_tokens_delta``), and ``LoraConfig(trainable_token_indices=...)`` beside a
LoRA (keys ``<embedding>.token_adapter.trainable_tokens_delta``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import surgery
from peftlab.config import LayerConfig, PeftConfig, PeftType
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.layers import AdapterView, LayerWrapper, ModulesToSave
from peftlab.registry import MethodSpec, register


def check_token_indices(owner: str, indices: object) -> list[int]:
    """``indices`` if it is a non-empty list of distinct non-negative ints, else a PeftConfigError."""
    if (
        not isinstance(indices, (list, tuple))
        or not indices
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
    ):
        raise PeftConfigError(f"{owner}: token indices must be a non-empty list of non-negative ints, got {indices!r:.200}.")
    if len(set(indices)) != len(indices):
        raise PeftConfigError(f"{owner}: token indices must be distinct, got {list(indices)!r:.200}.")
    return list(indices)


@dataclass
class TrainableTokensConfig(LayerConfig):
    """Train the embedding rows of a few tokens.

    Args:
        token_indices: the rows (token ids) to train, e.g. the ids of tokens just added to the vocabulary.
        target_modules: the embedding(s); None takes the model's input embedding.
        init_weights: True starts each row as the token's current embedding (the model is unchanged);
            False draws it from N(0, 1) (for tests).
    """

    peft_type = PeftType.TRAINABLE_TOKENS
    # peft's TrainableTokensConfig lacks these; left out of the JSON while unset.
    peftlab_only_fields = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_indices = check_token_indices("TrainableTokensConfig", self.token_indices)
        if not isinstance(self.init_weights, bool):
            raise PeftConfigError(f"TrainableTokensConfig: init_weights must be True or False, got {self.init_weights!r}.")


class TokenRows(AdapterView):
    """Trained rows replacing rows ``token_indices`` of an Embedding's table (or of a Linear's weight:
    one row per output unit). ``trainable_tokens_delta``: (n, dim)."""

    #: Writing rows is the same whichever module shares the weight: merging needs no untying.
    merge_unties_shared_weight: ClassVar[bool] = False

    def __init__(self, base: nn.Module, indices: Sequence[int], init_weights: bool, module_name: str, own_rows: bool = True) -> None:
        super().__init__()
        kind_ok = isinstance(base, nn.Embedding) or (isinstance(base, nn.Linear) and not BL.is_quantized(base))
        if not kind_ok:
            raise TargetModuleError(
                f"trainable tokens train rows of an nn.Embedding (or of a tied nn.Linear head), and {module_name} is a "
                f"{type(base).__name__}; target the embedding."
            )
        rows = base.weight.shape[0]
        if max(indices) >= rows:
            raise TargetModuleError(f"trainable tokens: index {max(indices)} is beyond the {rows} rows of {module_name}; "
                                    f"resize the token embeddings first (model.resize_token_embeddings).")
        self.token_indices = list(indices)
        # The rows as they were (for unmerge): a plain tensor, not saved, as in peft.
        self.original_rows = base.weight.detach()[self.token_indices].clone()
        if own_rows:
            start = self.original_rows.clone() if init_weights else torch.randn_like(self.original_rows)
            self.trainable_tokens_delta = nn.Parameter(start)

    def rows(self) -> torch.Tensor:
        return self.trainable_tokens_delta

    def _index(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices, device=device)

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        base = self.__dict__["_layer"].base_layer
        rows = self.rows()
        if isinstance(base, nn.Embedding):
            lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
            lookup[self._index(x.device)] = torch.arange(len(self.token_indices), device=x.device)
            position = lookup[x]  # (...,): which trained row each token takes, -1 for none
            picked = rows[position.clamp(min=0)]
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale every looked-up row
            if scale is not None:
                picked = picked * torch.as_tensor(scale, dtype=picked.dtype, device=picked.device)
            return torch.where((position >= 0).unsqueeze(-1), picked.to(out.dtype), out)
        index = self._index(out.device)
        bias = base.bias[index] if base.bias is not None else None
        chosen = F.linear(x.to(rows.dtype), rows, None if bias is None else bias.to(rows.dtype))  # (..., n)
        return out.index_copy(out.dim() - 1, index, chosen.to(out.dtype))

    def _write_rows(self, base_layer: nn.Module, rows: torch.Tensor) -> None:
        weight = base_layer.weight
        weight.data.index_copy_(0, self._index(weight.device), rows.detach().to(device=weight.device, dtype=weight.dtype))

    def merge_into(self, base_layer: nn.Module) -> None:
        self._write_rows(base_layer, self.rows())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        self._write_rows(base_layer, self.original_rows)


class TiedTokenRows(TokenRows):
    """An output head whose weight is the embedding's: it reads the embedding adapter's rows.

    peft's method files list those rows under the head's key too (the same tensor); its LoRA files
    do not. ``listed`` says which.
    """

    def __init__(self, base: nn.Module, source: TokenRows, module_name: str, listed: bool) -> None:
        super().__init__(base, source.token_indices, True, module_name, own_rows=False)
        self.__dict__["_source"] = source
        self.__dict__["_listed"] = listed

    def rows(self) -> torch.Tensor:
        return self.__dict__["_source"].trainable_tokens_delta

    def held_tensors(self) -> dict[str, torch.Tensor]:
        if not self.__dict__["_listed"]:
            return {}
        return {self.disk_keys.get("trainable_tokens_delta", "trainable_tokens_delta"): self.rows()}


class LoraTokenRows(TokenRows):
    """Token rows trained beside a LoRA (``trainable_token_indices``): peft files them under ``token_adapter.``."""

    disk_keys: ClassVar[dict[str, str]] = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}


class LoraTiedTokenRows(TiedTokenRows):
    disk_keys: ClassVar[dict[str, str]] = LoraTokenRows.disk_keys


def input_embedding_name(model: nn.Module) -> str:
    """Path of the model's input embedding (``get_input_embeddings()``), else the module named ``embed_tokens``."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if (embedding is not None and module is embedding) or (embedding is None and name.rsplit(".", 1)[-1] == "embed_tokens"):
            return name
    raise TargetModuleError(f"{type(model).__name__} has no input embedding (get_input_embeddings) or embed_tokens module; "
                            f"name the embedding in target_modules / trainable_token_indices.")


def _tied_heads(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Paths of the Linear modules whose weight is the embedding's very parameter (tied output heads)."""
    weight = surgery.base_of(embedding).weight
    return [
        name for name, module in model.named_modules()
        if isinstance(surgery.base_of(module), nn.Linear) and surgery.base_of(module).weight is weight
        and not _inside_wrapper(model, name)
    ]


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    """Whether ``name`` lies inside a LayerWrapper or ModulesToSave (a base layer, a head's copies)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), (LayerWrapper, ModulesToSave)) for i in range(1, len(parts)))


def tie_output_heads(model: nn.Module, adapter_name: str, lora: bool) -> None:
    """Give each output head tied to the input embedding a view of the embedding adapter's rows."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, LayerWrapper) or not isinstance(embedding.adapters.get(adapter_name), TokenRows):
        return
    source = embedding.adapters[adapter_name]
    heads = _tied_heads(model, embedding)
    taken = [h for h in heads if isinstance(model.get_submodule(h), LayerWrapper) and adapter_name in model.get_submodule(h).adapters]
    if taken:
        raise TargetModuleError(
            f"{taken} shares its weight with the input embedding, whose rows this adapter trains, and is adapted by it too; "
            f"leave the tied head out (it follows the embedding's trained rows)."
        )
    tied_cls = LoraTiedTokenRows if lora else TiedTokenRows
    surgery.inject_adapter(model, heads, adapter_name, lambda base, name: tied_cls(base, source, name, listed=not lora))


def add_token_rows(model: nn.Module, indices: list[int] | dict[str, list[int]], adapter_name: str, skip: Sequence[str] = ()) -> None:
    """LoRA's ``trainable_token_indices``: token rows beside the LoRA (a list: on the input embedding;
    a dict: module name or dotted suffix -> indices), tied heads following the embedding."""
    targets = {input_embedding_name(model): indices} if isinstance(indices, list) else dict(indices)
    clash = [t for t in targets if t in skip]
    if clash:
        raise PeftConfigError(f"{clash} are in modules_to_save and in trainable_token_indices; train an embedding fully "
                              f"(modules_to_save) or a few of its rows (trainable_token_indices), not both.")
    names: dict[str, list[int]] = {}
    for key, rows in targets.items():
        found = [n for n, _ in model.named_modules() if n and (n == key or n.endswith("." + key)) and not _inside_wrapper(model, n)]
        if not found:
            raise TargetModuleError(f"trainable_token_indices names {key!r}, which matches no module of {type(model).__name__}.")
        names.update({n: rows for n in found})
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    tied = set(_tied_heads(model, embedding)) if embedding is not None else set()
    embedding_rows = next((rows for n, rows in names.items() if model.get_submodule(n) is embedding), None)
    for head in tied & set(names):
        if embedding_rows is not None and names[head] != embedding_rows:
            raise PeftConfigError(f"{head} shares its weight with the input embedding; give both the same token indices "
                                  f"({embedding_rows} vs {names[head]}), or only the embedding's.")
        if embedding_rows is not None:
            del names[head]  # follows the embedding's rows
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LayerWrapper) and adapter_name in module.adapters:
            raise TargetModuleError(f"{name} is adapted by this LoRA already; trainable_token_indices and target_modules "
                                    f"must name different modules.")
    surgery.inject_adapter(model, list(names), adapter_name,
                           lambda base, name: LoraTokenRows(base, names[name], True, name))
    tie_output_heads(model, adapter_name, lora=True)


def _default_targets(config: PeftConfig, model: nn.Module) -> list[str]:
    return [input_embedding_name(model)]


def make_token_rows(base: nn.Module, config: TrainableTokensConfig, adapter_name: str, module_name: str) -> TokenRows:
    return TokenRows(base, config.token_indices, config.init_weights, module_name)


register(MethodSpec(
    TrainableTokensConfig,
    make_token_rows,
    default_targets_for=_default_targets,
    after_add=lambda model, config, adapter_name: tie_output_heads(model, adapter_name, lora=False),
    # A workbench run names no tokens: train the first rows (special tokens in most vocabularies) beside the
    # task head; name the rows you added with token_indices.
    run_defaults={"token_indices": [0, 1, 2, 3]},
    learning_rates=(1e-3, 3e-3, 1e-2),
))

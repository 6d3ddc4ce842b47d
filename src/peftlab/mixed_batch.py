"""Mixed batches: run the rows sorted by adapter, give the caller's row order back.

A layer computes a mixed batch fastest when each adapter's rows are contiguous: every adapter
then works on its own slice, as in a one-adapter batch (see
:func:`peftlab.kernels.mixed_lora_forward`). Rows interleaved across adapters force every row
through every adapter's rank block instead (1.21x the bare model against 1.09x grouped, MiniLM,
seq 64, docs/benchmarks.md). So :class:`~peftlab.peft_model.PeftModel` sorts the rows once at the
model's input, by adapter in order of first appearance, and puts the outputs back in the
caller's order.

Only where that is safe: no cache in or out (a cache built for permuted rows would come back
permuted, so causal LMs and encoder-decoders keep the caller's order unless the call passes
``use_cache=False`` and no cache), inputs that are clearly per-row or clearly not, and outputs
made of batch-first tensors, scalars, ``None`` and containers of those. Anything else in the
output and the batch is run again in the caller's order.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftlab.kernels import row_runs

_CACHE_ARGUMENTS = ("past_key_values", "cache", "use_cache")
_NOT_RESTORABLE = object()


def grouping_order(names: Sequence[str]) -> list[int] | None:
    """Row order that groups equal names (stable, by first appearance); None when already grouped.

    "Grouped" matches the kernel's threshold: at most two runs of equal names per distinct name.
    """
    distinct = list(dict.fromkeys(names))
    if len(row_runs(names)) <= 2 * len(distinct):
        return None
    rank = {name: i for i, name in enumerate(distinct)}
    return sorted(range(len(names)), key=lambda i: rank[names[i]])


def takes_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts a key/value cache (its outputs may then hold one)."""
    if "forward" in model.__dict__:  # a forward set on the instance: read it each time
        return _signature_takes_cache(model.forward)
    return _class_takes_cache(type(model))


@functools.cache
def _class_takes_cache(cls: type) -> bool:  # reading a signature costs ~20 us: once per class
    return _signature_takes_cache(cls.forward)


def _signature_takes_cache(forward: Any) -> bool:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return True  # unknown: treat as unsafe to reorder
    return any(name in params for name in _CACHE_ARGUMENTS)


def safe_to_reorder(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """No cache goes in or comes out: none is passed (not even through a forward's ``**kwargs``),
    and the model takes none or the call says ``use_cache=False``."""
    if any(kwargs.get(name) is not None for name in ("past_key_values", "cache")):
        return False
    return not takes_cache(model) or kwargs.get("use_cache") is False


# Inputs known to hold one entry per row. Another tensor whose first dimension happens to equal
# the batch size (a head mask with as many layers as rows, say) would be ambiguous: no regrouping.
_ROW_INPUTS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
    "pixel_values", "pixel_mask", "input_features", "input_values", "decoder_input_ids",
    "decoder_attention_mask", "decoder_inputs_embeds",
})


def permute_inputs(args: tuple, kwargs: dict[str, Any], order: list[int], batch: int) -> tuple[tuple, dict[str, Any]] | None:
    """The inputs with their rows in ``order``; None when some tensor might or might not be per-row.

    Per-row inputs are the first positional argument and the names in ``_ROW_INPUTS``; other
    tensors are left alone unless their first dimension equals the batch size (then: None).
    """
    index: torch.Tensor | None = None

    def is_batch_sized(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch

    def reorder(value: Any) -> Any:
        nonlocal index
        if not is_batch_sized(value):
            return value
        if index is None or index.device != value.device:
            index = torch.tensor(order, device=value.device)
        return value.index_select(0, index)

    if any(is_batch_sized(a) for a in args[1:]) or any(is_batch_sized(v) for k, v in kwargs.items() if k not in _ROW_INPUTS):
        return None
    return tuple(reorder(a) for a in args), {k: reorder(v) for k, v in kwargs.items()}


def restore_output(output: Any, order: list[int]) -> Any:
    """``output`` of the reordered batch in the caller's row order, or None when it cannot be restored."""
    inverse = [0] * len(order)
    for position, row in enumerate(order):
        inverse[row] = position
    restored = _restore(output, inverse, len(order), {})
    return None if restored is _NOT_RESTORABLE else restored


def _restore(value: Any, inverse: list[int], batch: int, index_by_device: dict) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value  # a loss or other batch reduction
        if value.shape[0] != batch:
            return _NOT_RESTORABLE  # not batch-first: cannot tell which rows are whose
        index = index_by_device.get(value.device)
        if index is None:
            index = index_by_device[value.device] = torch.tensor(inverse, device=value.device)
        return value.index_select(0, index)
    if type(value) in (dict, OrderedDict) or _is_model_output(value):
        items = {k: _restore(v, inverse, batch, index_by_device) for k, v in value.items()}
        if any(v is _NOT_RESTORABLE for v in items.values()):
            return _NOT_RESTORABLE
        return type(value)(**items) if _is_model_output(value) else type(value)(items)
    if type(value) in (tuple, list):
        parts = [_restore(v, inverse, batch, index_by_device) for v in value]
        if any(p is _NOT_RESTORABLE for p in parts):
            return _NOT_RESTORABLE
        return type(value)(parts)
    return _NOT_RESTORABLE


def _is_model_output(value: Any) -> bool:
    try:
        from transformers.utils import ModelOutput
    except ImportError:
        return False
    return isinstance(value, ModelOutput)


def group_rows(rows: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Row indices per adapter name, in order of first appearance (how a wrapper splits a mixed batch)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(rows):
        groups.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, device=device, dtype=torch.long) for name, idx in groups.items()}

"""What an adapter reads of the layer it wraps: the one place layer kinds differ.

Base layers come in kinds that store the same thing differently: ``nn.Linear`` keeps its weight
as (out, in), GPT-2's ``Conv1D`` as (in, out), bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
pack it into bytes (their ``weight.shape`` is not the matrix's), ``nn.Conv2d`` keeps a kernel and
``nn.Embedding`` a (num_embeddings, dim) table. Methods never look at those details; they ask:

* :func:`features` — (in, out) sizes: features for linears, channels for Conv2d,
  (num_embeddings, embedding_dim) for Embedding;
* :func:`weight_shape` — the logical weight shape: (out, in) for every linear kind, the kernel
  (out, in / groups, kh, kw) for Conv2d, (num_embeddings, dim) for Embedding;
* :func:`dense_weight` — that weight as a dense tensor of at least fp32 (dequantized, un-transposed);
* :func:`add_to_weight` / :func:`write_weight` — merges: a delta or a new weight in the logical
  layout, written back in the layer's own storage (transposed for Conv1D, re-packed for 4-/8-bit,
  which is lossy; see :mod:`peftlab.quantization`);
* :func:`settle_fan_in_fan_out` — whether the weight is stored (in, out), correcting a config's
  ``fan_in_fan_out`` that says otherwise (as peft does, with a warning).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from peftlab import quantization
from peftlab.errors import caller_stacklevel


def conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` class, or None when transformers is not loaded.

    Looked up, not imported: a model holding a Conv1D has imported it already, and importing
    transformers here would put its import time on every ``import peftlab``.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_types() -> tuple[type, ...]:
    """Layer classes that count as linear: nn.Linear (bitsandbytes' quantized linears subclass it), Conv1D if loaded."""
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_linear(base: nn.Module) -> bool:
    return isinstance(base, linear_types())


def is_quantized(base: nn.Module) -> bool:
    """A bitsandbytes 4-/8-bit linear: its weight is packed, reads dequantize, writes re-quantize."""
    return quantization.is_quantized_linear(base)


def is_transposed(base: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out), the transpose of every other linear."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(base, conv1d)


def settle_fan_in_fan_out(method: str, base: nn.Module, config: Any) -> bool:
    """Whether ``base`` stores its weight as (in, out); a ``config.fan_in_fan_out`` that says otherwise is
    corrected in the config itself, with a warning, so the saved adapter_config.json says what was used
    (peft does the same: GPT-2 Conv1D sets it to True, nn.Linear to False)."""
    transposed = is_transposed(base)
    if bool(config.fan_in_fan_out) != transposed:
        warnings.warn(
            f"{method}: fan_in_fan_out={config.fan_in_fan_out} but {type(base).__name__} stores its weight as "
            f"{'(in, out)' if transposed else '(out, in)'}; setting fan_in_fan_out={transposed} in the config.",
            stacklevel=caller_stacklevel(),
        )
        config.fan_in_fan_out = transposed
    return transposed


def features(base: nn.Module) -> tuple[int, int]:
    """(in, out) sizes of ``base``; see the module docstring for each kind."""
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if is_transposed(base):
        in_features, out_features = base.weight.shape
        return int(in_features), int(out_features)
    if isinstance(base, nn.Linear):  # in_features, not weight.shape: quantized linears pack their weight
        return base.in_features, base.out_features
    raise TypeError(f"{type(base).__name__} is not a base layer kind peftlab knows (Linear, Conv1D, Conv2d, Embedding).")


def weight_shape(base: nn.Module) -> tuple[int, ...]:
    """The logical weight shape: (out, in) for linears, the kernel for Conv2d, the table for Embedding."""
    if isinstance(base, (nn.Conv2d, nn.Embedding)):
        return tuple(base.weight.shape)
    in_features, out_features = features(base)
    return out_features, in_features


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The weight the layer multiplies with, in the logical layout (a copy only when needed)."""
    if is_quantized(base):
        return quantization.dequantize_weight(base)
    weight = base.weight.detach()
    # At least fp32: half-precision bases are read in fp32, fp64 ones (gradient checks) stay exact.
    return (weight.T if is_transposed(base) else weight).to(torch.promote_types(weight.dtype, torch.float32))


def add_to_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` in place (``delta`` in the logical layout); packed weights are re-quantized."""
    if is_quantized(base):
        quantization.add_to_quantized_weight(base, delta)
        return
    weight = base.weight
    weight.data += (delta.T if is_transposed(base) else delta).to(weight.dtype)


def write_weight(base: nn.Module, new: torch.Tensor) -> None:
    """Replace the weight's values by ``new`` (logical layout); packed weights are re-quantized."""
    if is_quantized(base):
        quantization.add_to_quantized_weight(base, new.to(torch.float32) - dense_weight(base))
        return
    weight = base.weight
    weight.data = (new.T if is_transposed(base) else new).to(weight.dtype).contiguous()

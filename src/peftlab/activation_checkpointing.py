"""Activation (gradient) checkpointing for a model with adapters.

Hugging Face models checkpoint their decoder blocks themselves
(``activation_checkpointing_enable`` / the older ``gradient_checkpointing_enable``); the
adapters live inside those blocks, so their forward is recomputed with the block's in
backward. Two things make that exact and working:

* torch's checkpoint restores the RNG state before recomputing (``preserve_rng_state``), and
  every adapter dropout mask is drawn from torch's generator (the fused LoRA kernel seeds its
  SFC64 words with one draw from it), so the recomputed masks equal the first ones;
* with ``use_reentrant=True`` a checkpointed block only produces gradients when one of its
  *inputs* requires grad, which a frozen embedding's output does not: the input embeddings'
  output is then marked as requiring grad (what peft does too). The non-reentrant default of
  transformers needs nothing.

With non-reentrant checkpointing (transformers' default) the narrow LoRA layers' outputs are
kept through each block (:mod:`peftlab.output_stash`), so recomputation skips their base
matmul: about half of a Llama block's linear arithmetic, for ``3 d + 2 d_kv`` floats per token
and block. ``keep_narrow_outputs=False`` keeps only the block inputs (the least memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import nn

from peftlab import output_stash
from peftlab.errors import AdapterStateError


def _with_stash(context_fn: Callable[[], tuple[Any, Any]] | None) -> Callable[[], tuple[Any, Any]]:
    """``context_fn`` for torch's checkpoint: the output stash's contexts, inside the caller's own if given."""
    if context_fn is None:
        return output_stash.checkpoint_contexts

    def both() -> tuple[Any, Any]:
        (theirs_fwd, theirs_re), (ours_fwd, ours_re) = context_fn(), output_stash.checkpoint_contexts()
        return _entered(theirs_fwd, ours_fwd), _entered(theirs_re, ours_re)

    return both


@contextlib.contextmanager
def _entered(*contexts: Any):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def enable(model: nn.Module, checkpoint_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
           offload: bool = False, keep_narrow_outputs: bool = True) -> None:
    """Turn on activation checkpointing in ``model`` (a transformers model), fit for adapter training.

    ``keep_narrow_outputs`` (non-reentrant only) keeps the outputs of LoRA layers no wider than
    their input through each block, so that recomputation skips their base matmul. Not with
    ``offload``: that asks for the least device memory, and the kept outputs stay on the device.
    """
    kwargs = dict(checkpoint_kwargs) if checkpoint_kwargs else None
    if keep_narrow_outputs and not offload and not (kwargs or {}).get("use_reentrant", False):
        kwargs = {"use_reentrant": False, **(kwargs or {})}
        kwargs["context_fn"] = _with_stash(kwargs.get("context_fn"))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                              offload=offload)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise AdapterStateError(f"{type(model).__name__} has no activation checkpointing of its own; "
                                f"use a transformers model or wrap its blocks in torch.utils.checkpoint yourself.")
    if kwargs and kwargs.get("use_reentrant"):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


def disable(model: nn.Module) -> None:
    """Turn activation checkpointing off again."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()

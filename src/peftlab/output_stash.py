"""Keep the outputs of narrow LoRA layers through a checkpointed block, so that recomputation skips their base matmul.

Activation checkpointing keeps a block's input and runs the block's forward again in backward
to get back what backward needs. For a LoRA layer that is ``x`` (the layer's input) and the
rank-r activation ``h``; its output, the frozen base product ``x W^T``, is needed only by the
layers after it, and recomputing it is most of the recomputation's cost. A layer whose output
is no wider than its input (``out_features <= in_features``: q, k, v, o and down in a
Llama-style block) costs ``in_features`` multiply-adds per output element, the most arithmetic
per byte kept: keeping those outputs (``3 d + 2 d_kv`` floats per token in a Llama block,
against the ``d`` the checkpoint keeps anyway) skips half of a block's linear arithmetic in
recomputation. The widening layers (gate, up) are recomputed as before.

:func:`checkpoint_contexts` is a ``context_fn`` for :func:`torch.utils.checkpoint.checkpoint`
(non-reentrant): its first context records, its second replays. The fused LoRA node
(:func:`peftlab.kernels.lora_linear`) asks :func:`active` for the stash. A kept output that
something changed in place after the layer returned it (its version counter moved) is not
replayed: that layer computes its output again, so the result is always the one a plain
recomputation gives.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator

import torch


class OutputStash:
    """The outputs one checkpointed block's narrow LoRA layers returned, in call order."""

    def __init__(self) -> None:
        self.replaying = False
        self._entries: deque[tuple[int, torch.Tensor, int]] = deque()

    @staticmethod
    def wanted(in_features: int, out_features: int) -> bool:
        return out_features <= in_features

    def keep(self, layer: object, out: torch.Tensor) -> None:
        """Record ``layer``'s output as returned (later in-place changes are detected, not missed)."""
        self._entries.append((id(layer), out.detach(), out._version))

    def take(self, layer: object, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """``layer``'s recorded output if it is next and still what the layer returned, else None (compute it)."""
        if not self._entries or self._entries[0][0] != id(layer):
            return None
        _, out, version = self._entries.popleft()
        if out.shape != shape or out.dtype != dtype or out._version != version:
            return None
        return out

    @property
    def nbytes(self) -> int:
        return sum(out.untyped_storage().nbytes() for _, out, _ in self._entries)


_state = threading.local()


def active() -> OutputStash | None:
    """The stash of the checkpointed block running on this thread, if any."""
    return getattr(_state, "stash", None)


@contextlib.contextmanager
def _using(stash: OutputStash, replaying: bool) -> Iterator[None]:
    previous = active()
    stash.replaying = replaying
    _state.stash = stash
    try:
        yield
    finally:
        _state.stash = previous


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A ``context_fn`` for non-reentrant checkpointing: one stash per checkpointed call."""
    stash = OutputStash()
    return _using(stash, replaying=False), _using(stash, replaying=True)

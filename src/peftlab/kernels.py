"""Fast paths for LoRA on plain ``nn.Linear`` / GPT-2 ``Conv1D`` layers.

The readable path (``LoraLinear.adapt_output``) computes ``W x + b + s * B A dropout(x)`` with
stock modules. It is correct but wasteful on training steps:

* ``nn.Dropout`` draws a float32 random number per input element, keeps a float copy of the
  dropped input for ``A``'s weight gradient and a float mask for the input gradient;
* the adapter output is added to the base output out of place (one more full-size pass).

:class:`LoraLinearFunction` computes the same value in one autograd node that keeps only what
backward needs: the input ``x`` (usually shared with sibling layers, so no new memory), the
rank-r activation ``A dropout(x)`` and the dropout mask's seed; backward draws the mask again
from the seed. For small drop probabilities (``p <= 0.05``, on CPU) the mask is drawn as the
positions of the dropped elements (geometric gaps, one random word per drop) and never becomes
an input-sized tensor: the forward subtracts the dropped elements' share from ``x A^T`` (a sparse
product), the backward zeroes those positions in place. Otherwise it is drawn from 16 random bits
per element (a quarter of one 64-bit draw), four to six times cheaper than ``nn.Dropout``, as
uint8 0/1 (applied by a multiply). Also:

* the weight gradient of B, ``s g^T h``, is computed as ``s (h^T g)^T``: the same numbers,
  but BLAS on this CPU takes half the time when the big (N, out) operand is not the
  transposed left factor (``benchmarks/bench_skinny_matmul.py``, which times both orders of
  every rank-r product; the others are computed in whichever order measured faster);
* the adapter output is accumulated into the base output with one in-place ``addmm``.

Folding the update into the weight (``x (W + s B A)^T``, possible without dropout) was tried
and dropped: alone, the fold costs more than the addmm it replaces (bench_skinny_matmul.py),
and whole training and inference steps were no faster with it.

Gradients are the exact gradients of the same formula (checked by ``gradcheck``).

:func:`mixed_lora_forward` serves mixed batches (one adapter per row): the base layer runs once;
rows grouped by adapter get their own update on their contiguous slice (no copies); otherwise
every adapter's ``A`` runs as one stacked matmul, a row selector zeroes the blocks of other
adapters, and one ``addmm`` with the stacked ``s B`` adds every row's own update.

Set ``PEFTLAB_PLAIN=1`` to force the readable path everywhere (for debugging and A/B checks).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peftlab import output_stash
from peftlab.base_layer import conv1d_type

_MASK_BITS = 16  # random bits per element; the drop probability is p rounded to 1 / 65536


def plain_forced() -> bool:
    """True when ``PEFTLAB_PLAIN=1``: every layer takes the readable path."""
    return os.environ.get("PEFTLAB_PLAIN", "") == "1"


def compiling() -> bool:
    """True while ``torch.compile`` traces: the dropout masks' seed is a host integer (one draw from
    torch's CPU generator) and the CPU words come from numpy, so a fused node with dropout would
    break the graph at every adapted layer (tests/cuda/test_cuda_compile.py). The readable path's
    ``nn.Dropout`` compiles into the graph instead; without dropout the fused node is traced as is."""
    return torch.compiler.is_compiling()


def fast_base(base: nn.Module) -> bool:
    """Whether ``base`` is a plain, frozen Linear / Conv1D the fast path may bypass.

    Exact type checks on purpose: subclasses (bitsandbytes' quantized linears, or anything with
    its own forward) and layers with hooks keep calling their own ``forward``.
    """
    if type(base) is not nn.Linear and type(base) is not conv1d_type():
        return False
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return False
    weight = base.weight
    return type(weight) is nn.Parameter and weight.is_floating_point() and not weight.requires_grad


def mask_seed() -> int:
    """One int64 draw from torch's default CPU generator: the seed of one dropout mask.

    Drawing it from torch makes masks follow ``torch.manual_seed`` and lets activation
    checkpointing (which restores torch's RNG state before recomputing) draw the same masks again.
    """
    return int(torch.empty((), dtype=torch.int64).random_())


def random_words(count: int, device: torch.device | str = "cpu", seed: int | None = None) -> torch.Tensor:
    """``count`` uniformly random int64 words from ``seed`` (default: :func:`mask_seed`).

    On CPU the words come from numpy's SFC64 generator: torch's own CPU generator (a Mersenne
    Twister, one thread) takes ~4.5 ns per word, SFC64 ~2.3 ns, and the draw is the largest part
    of a dropout mask's cost (docs/benchmarks.md, "What makes peftlab's LoRA fast"). Elsewhere a
    torch generator of that device, seeded with ``seed``, fills them.
    """
    seed = mask_seed() if seed is None else seed
    if torch.device(device).type != "cpu":
        # Not exercised by the CPU-only test suite (no accelerator here): excluded from mutation.
        generator = torch.Generator(device=device).manual_seed(seed)  # pragma: no mutate
        return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)  # pragma: no mutate
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


def keep_mask(shape: Sequence[int], p: float, device: torch.device | str = "cpu", seed: int | None = None) -> torch.Tensor:
    """A uint8 0/1 mask, 1 with probability ``1 - p`` (to 1/65536), from :func:`random_words`.

    The same ``seed`` gives the same mask: the fused LoRA node keeps the seed instead of the mask
    and draws the mask again in backward.

    Four mask elements share one 64-bit word, which is what makes it cheap; ``torch.manual_seed``
    makes it reproducible like any other torch random op. Element ``i`` is 1 exactly when its 16
    bits, read as int16, are ``>= -32768 + round(p * 65536)``. The 0/1 values come from an
    integer clamp, and the mask is applied with a multiply, not ``torch.where`` on a bool mask:
    on this CPU every op that makes or reads a bool tensor is several times slower than the
    uint8 one (with the in-place input-gradient ``addmm_`` that made MiniLM all-linear training
    steps 10% faster with dropout 0.1 and 2% without; docs/benchmarks.md).
    """
    numel = math.prod(shape)
    cut = round(p * 2**_MASK_BITS)  # how many of the 65536 values drop
    if cut <= 0 or numel == 0:
        return torch.ones(tuple(shape), dtype=torch.uint8, device=device)
    if cut >= 2**_MASK_BITS:
        return torch.zeros(tuple(shape), dtype=torch.uint8, device=device)
    bits = random_words((numel + 3) // 4, device, seed)
    threshold = -(2 ** (_MASK_BITS - 1)) + cut
    # clamp to {threshold - 1, threshold}, minus (threshold - 1): 0 below the threshold, 1 at or above.
    mask = bits.view(torch.int16)[:numel].clamp_(threshold - 1, threshold).sub_(threshold - 1)
    return mask.to(torch.uint8).view(*shape)


def drop_positions(numel: int, p: float, seed: int, chunk: int | None = None) -> torch.Tensor:
    """Sorted int64 flat indices of the dropped elements of ``numel``, each dropped with probability ``p``.

    For small ``p`` it is cheaper to draw only the dropped positions than a bit pattern for every
    element: the gaps between drops of independent Bernoulli(p) trials are geometric, and one
    SFC64 word per drop gives one gap by inversion, ``floor(log(u) / log(1 - p))`` kept elements
    before the next drop (``u`` uniform in (0, 1] from the word's low 53 bits). So ~``p * numel``
    words and logs instead of ``numel / 4`` words and five passes over a full-size mask. The words
    come in chunks of ``chunk`` (default: enough for the expected count plus six standard
    deviations, so a second chunk is rare); the chunk size does not change the result.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop_positions needs 0 < p < 1, got p={p}")
    generator = np.random.SFC64(seed)
    per_gap = 1.0 / np.log1p(-p)  # negative: log(u) <= 0 becomes a gap >= 0
    if chunk is None:
        mean = numel * p
        chunk = int(mean + 6.0 * (mean * (1.0 - p)) ** 0.5) + 16
    parts, start = [], 0  # start: the position the next gap counts from
    while start < numel:
        words = torch.from_numpy(generator.random_raw(chunk).view(np.int64))
        uniform = words.bitwise_and_(2**53 - 1).to(torch.float64).add_(0.5).mul_(2.0**-53)  # in (0, 1]
        # gap + 1 steps from one drop to the next; cumulative sums give the positions
        positions = uniform.log_().mul_(per_gap).floor_().to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        start = int(positions[-1]) + 1
        parts.append(positions)
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, numel))]


_CSR_PRIMED = False


@contextlib.contextmanager
def _warnings_silenced():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _csr_rows(positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The (rows, width) sparse CSR matrix with ``values`` at the sorted flat ``positions``.

    torch warns once per process that CSR support is in beta; the first matrix is built with that
    warning silenced, so the warning does not reach users of the kernel (invariants: sorted, distinct
    in-range positions by construction, so the checks are off on purpose).
    """
    global _CSR_PRIMED
    rows, width = shape
    crow = torch.searchsorted(positions, torch.arange(rows + 1, device=positions.device) * width)
    with contextlib.nullcontext() if _CSR_PRIMED else _warnings_silenced():
        matrix = torch.sparse_csr_tensor(crow, positions % width, values, size=shape, check_invariants=False)
    _CSR_PRIMED = True
    return matrix


_SPARSE_MAX_P = 0.05  # up to this drop probability CPU masks are drawn as drop positions (measured: docs/benchmarks.md)


@dataclass(frozen=True)
class DropMask:
    """A dropout mask by its recipe: the same ``seed`` gives the same mask each time.

    The fused node keeps this (a few bytes) instead of a 1-byte-per-element mask and draws the mask
    again in backward. On CPU with ``p <= 0.05`` the mask is drawn as the sorted positions of the
    dropped elements (:func:`drop_positions`), otherwise as a uint8 keep mask (:func:`keep_mask`);
    :meth:`pattern` draws whichever applies; :meth:`project`, :meth:`dropped_into` and :meth:`zero_dropped_` use it.
    """

    shape: tuple[int, ...]
    p: float
    device: torch.device
    seed: int

    @classmethod
    def draw(cls, shape: Sequence[int], p: float, device: torch.device | str) -> DropMask:
        return cls(tuple(shape), p, torch.device(device), mask_seed())

    @property
    def sparse(self) -> bool:
        """Whether :meth:`pattern` gives drop positions (CPU, ``0 < p <= 0.05``) rather than a keep mask."""
        return self.device.type == "cpu" and 0.0 < self.p <= _SPARSE_MAX_P

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def pattern(self, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Flat int64 positions of the dropped elements if :attr:`sparse`, else the uint8 keep mask.

        ``kept`` is what :meth:`to_keep` returned for this mask: the positions are read back from it
        instead of being drawn again.
        """
        if kept is not None:
            return kept.to(torch.int64)
        if self.sparse:
            return drop_positions(self.numel, self.p, self.seed)
        return keep_mask(self.shape, self.p, self.device, self.seed)

    def to_keep(self, pattern: torch.Tensor) -> torch.Tensor | None:
        """What a node saves for backward so it need not draw the mask again, or None.

        Drop positions are kept (int32 where they fit: 0.2 bytes per input element at p = 0.05);
        drawing them again in backward was ~1.5 % of a SmolLM2 step (docs/benchmarks.md). A keep
        mask is not kept (1 byte per element): backward draws it again from the seed.
        """
        if not self.sparse:
            return None
        return pattern.to(torch.int32) if self.numel < 2**31 else pattern

    def dropped_into(self, x: torch.Tensor, pattern: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (contiguous, x's shape) set to ``x`` with the dropped elements zeroed (not rescaled)."""
        if self.sparse:
            out.copy_(x)
            out.view(-1).index_fill_(0, pattern, 0)
            return out
        # the keep mask converted into out, then multiplied in place: an out-of-place float * uint8
        # multiply takes a slow mixed-dtype path on CPU (3.7 ms vs 0.48 ms for (1024, 1536); docs/benchmarks.md)
        return out.copy_(pattern).mul_(x)

    def project(self, x: torch.Tensor, lora_a: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """``(x * keep) A^T`` (unscaled), (N, r), for a 2-D ``x`` of the mask's shape.

        With drop positions in fp32/fp64 it never builds the dropped copy of x: ``x A^T`` minus the
        dropped elements' share, a sparse (N, in) matrix of ~``p N in`` entries times ``A^T``. A
        fresh input-sized tensor per layer costs more here than the mask (page faults on this CPU).
        """
        if self.sparse and x.dtype in (torch.float32, torch.float64):
            share = _csr_rows(pattern, x.reshape(-1)[pattern], self.shape)  # the dropped elements of x
            return torch.mm(x, lora_a.t()).sub_(torch.mm(share, lora_a.t()))
        return torch.mm(self.dropped_into(x, pattern, torch.empty(self.shape, dtype=x.dtype, device=x.device)), lora_a.t())

    def zero_dropped_(self, t: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Zero the dropped elements of the contiguous ``t`` (of the mask's shape) in place."""
        if self.sparse:
            t.view(-1).index_fill_(0, pattern, 0)
            return t
        return t.mul_(pattern)

    def keep(self) -> torch.Tensor:
        """The mask as a uint8 0/1 tensor of its shape, whichever way it is drawn."""
        if not self.sparse:
            return self.pattern()
        keep = torch.ones(self.numel, dtype=torch.uint8, device=self.device)
        return keep.index_fill_(0, self.pattern(), 0).view(self.shape)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def _adapter_activation(x: torch.Tensor, lora_a: torch.Tensor,
                        drop: DropMask | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = (x * keep / (1 - p)) A^T``, (N, r), the rank-r activation both LoRA nodes keep for
    backward, and what they keep of the mask (:meth:`DropMask.to_keep`).

    1/(1-p) is applied to the small h instead of the dropped x.
    """
    if drop is None:
        return torch.mm(x, lora_a.t()), None
    pattern = drop.pattern()
    return drop.project(x, lora_a, pattern).mul_(drop.scale), drop.to_keep(pattern)


def _adapter_backward(grad_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      h: torch.Tensor, drop: DropMask | None, kept: torch.Tensor | None, scaling: float, need_x: bool,
                      need_a: bool, need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``s h B^T`` (h and ``kept`` from :func:`_adapter_activation`): x's share (N, in), A's and B's.

    With dropout, one input-sized buffer holds the dropped x for A's gradient and then x's share
    (which the fused node turns into grad_x): one fresh allocation, as without dropout.
    """
    grad_a = grad_b = x_share = None
    # (h^T g)^T rather than g^T h: same numbers, half the time (the big operand is not transposed).
    if need_b:
        grad_b = torch.mm(h.t(), grad_out).t().mul_(scaling)  # (out, r)
    # Gradient reaching A's output, with the dropout scale folded in: (r, N), cheap.
    grad_h_t = torch.mm(lora_b.t(), grad_out.t()).mul_(scaling * (drop.scale if drop is not None else 1.0))
    if drop is None:
        if need_a:
            grad_a = torch.mm(grad_h_t, x)  # (r, in)
        if need_x:
            x_share = torch.mm(grad_h_t.t(), lora_a)  # (N, in)
    elif need_a or need_x:
        pattern = drop.pattern(kept)
        buffer = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if need_a:
            grad_a = torch.mm(grad_h_t, drop.dropped_into(x, pattern, buffer))
        if need_x:
            x_share = drop.zero_dropped_(torch.mm(grad_h_t.t(), lora_a, out=buffer), pattern)
    return x_share, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s * ((x * keep / (1 - p)) A^T) B^T`` with a frozen ``W`` (and maybe ``b``).

    Shapes: x (N, in), weight (out, in) or (in, out) when ``fan_in_fan_out``, lora_a (r, in),
    lora_b (out, r); ``drop`` is the dropout mask's recipe (keep has x's shape) or None (no dropout).
    Saved for backward: x itself, the (N, r) activation h, the mask's seed and, for drop positions,
    the positions (0.2 bytes per input element at p = 0.05). x is usually
    shared with sibling layers (q/k/v, gate/up read the same tensor) or held by the base model
    anyway, so LoRA adds ~nothing per element; ``nn.Dropout`` + ``nn.Linear`` keep a float copy of
    the dropped x and a mask per layer (8 bytes per input element), and keeping the dropped x and a
    1-byte mask here (the earlier version) cost 5. Backward reads the positions back (or draws a
    keep mask again) and recomputes the dropped x for A's gradient. ``known_out``: the output this
    node returned in forward, handed back during checkpointing's recomputation
    (:mod:`peftlab.output_stash`); only h is computed again then.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        drop: DropMask | None,
        scaling: float,
        fan_in_fan_out: bool,
        known_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, kept = _adapter_activation(x, lora_a, drop)  # (N, r)
        if known_out is not None:  # recomputation under checkpointing: the output was kept (output_stash)
            out = known_out
        else:
            w_t = weight if fan_in_fan_out else weight.t()  # (in, out)
            out = torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
            out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, kept)
        ctx.drop, ctx.scaling, ctx.fan_in_fan_out = drop, scaling, fan_in_fan_out
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight, lora_a, lora_b, h, kept = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        x_share, grad_a, grad_b = _adapter_backward(grad_out, x, lora_a, lora_b, h, ctx.drop, kept, ctx.scaling, need_x,
                                                    need_a, need_b)
        grad_x = grad_bias = None
        if need_x:
            w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
            grad_x = x_share.addmm_(grad_out, w)  # in place: out-of-place addmm would copy x_share first
        if need_bias:
            grad_bias = grad_out.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None


def lora_linear(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: float, training: bool) -> torch.Tensor | None:
    """The fused LoRA forward of one layer, or None when the readable path must run instead.

    Under autocast it computes in autocast's lower precision, as autocast would run the base
    layer and both adapter matmuls (casts outside the fused node, so gradients reach the fp32
    adapter weights through them).
    """
    if plain_forced() or not fast_base(base) or (training and dropout > 0 and compiling()):
        return None
    weight, bias = base.weight, base.bias
    if x.device != weight.device:
        return None
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        tensors = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
        if any(t.dtype not in (torch.float32, low) for t in tensors):
            return None  # autocast leaves float64 alone; so does the readable path
        with torch.autocast(device_type, enabled=False):
            return _fused(base, x.to(low), weight.to(low), None if bias is None else bias.to(low),
                          lora_a.to(low), lora_b.to(low), scaling, dropout, training)
    if not (x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype):
        return None
    return _fused(base, x, weight, bias, lora_a, lora_b, scaling, dropout, training)


def _fused(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
           lora_b: torch.Tensor, scaling: float, dropout: float, training: bool) -> torch.Tensor | None:
    fan_in_fan_out = type(base) is not nn.Linear
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        return None  # let the base layer raise its own shape error
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    drop = DropMask.draw(x2.shape, dropout, x2.device) if training and dropout > 0 else None
    stash = output_stash.active() if torch.is_grad_enabled() else None
    if stash is not None and not stash.wanted(in_features, lora_b.shape[0]):
        stash = None
    known_out = stash.take(base, (x2.shape[0], lora_b.shape[0]), x2.dtype) if stash is not None and stash.replaying else None
    out = LoraLinearFunction.apply(x2, weight, bias, lora_a, lora_b, drop, scaling, fan_in_fan_out, known_out)
    if stash is not None and not stash.replaying:
        stash.keep(base, out)
    return out.view(*lead, out.shape[-1])


class LoraDeltaFunction(torch.autograd.Function):
    """``s * ((x * keep / (1 - p)) A^T) B^T``: the adapter term alone, for bases the fused node
    cannot bypass (4-bit and 8-bit bitsandbytes layers, layers with hooks), with dropout.

    Keeps what :class:`LoraLinearFunction` keeps (x, h, the mask's seed and drop positions) where ``nn.Dropout``
    followed by ``lora_A`` keeps a dropped copy of x and a mask per layer. Without dropout the
    stock modules keep only x and h already, so this node is used only with dropout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, drop: DropMask,  # type: ignore[override]
                scaling: float) -> torch.Tensor:
        h, kept = _adapter_activation(x, lora_a, drop)  # (N, r)
        ctx.save_for_backward(x, lora_a, lora_b, h, kept)
        ctx.drop, ctx.scaling = drop, scaling
        return torch.mm(h, lora_b.t()).mul_(scaling)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, lora_a, lora_b, h, kept = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_a, grad_b = _adapter_backward(grad_out.contiguous(), x, lora_a, lora_b, h, ctx.drop, kept,
                                                   ctx.scaling, need_x, need_a, need_b)
        return grad_x, grad_a, grad_b, None, None


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: float,
               training: bool) -> torch.Tensor | None:
    """The adapter term with dropout through :class:`LoraDeltaFunction`, or None when the stock
    modules should compute it (no dropout in effect, autocast, mixed dtypes, ``PEFTLAB_PLAIN=1``)."""
    if not training or dropout <= 0 or plain_forced() or x.dim() == 0 or compiling():
        return None
    if torch.is_autocast_enabled(x.device.type) or not (x.dtype == lora_a.dtype == lora_b.dtype):
        return None
    if x.device != lora_a.device or x.shape[-1] != lora_a.shape[1]:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    delta = LoraDeltaFunction.apply(x2, lora_a, lora_b, DropMask.draw(x2.shape, dropout, x2.device), scaling)
    return delta.view(*x.shape[:-1], lora_b.shape[0])


# ----- mixed batches -----------------------------------------------------------------------------
_SELECTOR_CACHE: dict[tuple, torch.Tensor] = {}


def _row_selector(rows: Sequence[str], blocks: Sequence[tuple[str, int]], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(rows, sum of ranks) 0/1 matrix: row i keeps only the rank block of its own adapter."""
    key = (tuple(rows), tuple(blocks), dtype, device)
    sel = _SELECTOR_CACHE.get(key)
    if sel is None:
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, rank in blocks:
            offsets[name] = (start, start + rank)
            start += rank
        table = [[0.0] * start for _ in rows]
        for i, name in enumerate(rows):
            if name in offsets:
                lo, hi = offsets[name]
                table[i][lo:hi] = [1.0] * (hi - lo)
        sel = torch.tensor(table, dtype=dtype, device=device)
        if len(_SELECTOR_CACHE) > 64:
            _SELECTOR_CACHE.clear()
        _SELECTOR_CACHE[key] = sel
    return sel


_RUNS_CACHE: dict[tuple, list[tuple[str, int, int]]] = {}


def row_runs(rows: Sequence[str]) -> list[tuple[str, int, int]]:
    """Maximal runs of equal names: ``["a", "a", "b", "a"]`` -> ``[("a", 0, 2), ("b", 2, 3), ("a", 3, 4)]``."""
    key = tuple(rows)
    runs = _RUNS_CACHE.get(key)
    if runs is None:
        runs = []
        start = 0
        for i in range(1, len(key) + 1):
            if i == len(key) or key[i] != key[start]:
                runs.append((key[start], start, i))
                start = i
        if len(_RUNS_CACHE) > 64:
            _RUNS_CACHE.clear()
        _RUNS_CACHE[key] = runs
    return runs



def mixed_lora_forward(base: nn.Module, x: torch.Tensor, rows: Sequence[str],
                       adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                       max_total_rank: int = 256) -> torch.Tensor | None:
    """Base output plus, on each row, that row's LoRA update; None when the generic path must run.

    ``adapters`` maps a name to (A (r, in), B (out, r), scaling) for the adapters this layer holds;
    rows naming anything else get the base output. The base layer runs once over the whole batch.
    Then, when the rows come grouped (at most two runs of equal names per distinct name),
    each run's update is computed on its own contiguous slice, which costs what a single-adapter
    batch costs. Otherwise every adapter's A runs on every row (one stacked matmul) and a row
    selector keeps each row's own rank block: cheaper than many tiny slices, and it pays off while
    the summed rank stays small next to the layer width.
    """
    if plain_forced() or not fast_base(base) or not adapters or x.dim() < 2 or torch.is_autocast_enabled(x.device.type):
        return None
    weight = base.weight
    if any(a.dtype != x.dtype or b.dtype != x.dtype for a, b, _ in adapters.values()) or weight.dtype != x.dtype:
        return None
    runs = row_runs(rows)
    if len(runs) <= 2 * len(set(rows)):  # the same test as peftlab.mixed_batch.grouping_order
        out = base(x)
        in_features, out_features = x.shape[-1], out.shape[-1]
        x2, out2 = x.reshape(x.shape[0], -1, in_features), out.view(out.shape[0], -1, out_features)
        for name, first, stop in runs:
            factors = adapters.get(name)
            if factors is not None:
                lora_a, lora_b, scaling = factors
                h = torch.mm(x2[first:stop].reshape(-1, in_features), lora_a.t())
                out2[first:stop].view(-1, out_features).addmm_(h, lora_b.t(), alpha=scaling)
        return out
    names = list(adapters)
    total = sum(adapters[n][0].shape[0] for n in names)
    if total > max_total_rank:
        return None
    stacked_a = torch.cat([adapters[n][0] for n in names])  # (R, in)
    stacked_b = torch.cat([adapters[n][1] * adapters[n][2] for n in names], dim=1)  # (out, R)
    selector = _row_selector(rows, [(n, adapters[n][0].shape[0]) for n in names], x.dtype, x.device)  # (B, R)
    out = base(x)
    in_features, out_features = x.shape[-1], out.shape[-1]
    h = torch.mm(x.reshape(-1, in_features), stacked_a.t())  # (N, R)
    h = h.view(x.shape[0], -1, total) * selector.unsqueeze(1)
    out.view(-1, out_features).addmm_(h.view(-1, total), stacked_b.t())
    return out

"""Causal-LM loss in row chunks, without full-vocabulary logits for the whole batch.

A causal LM's training step usually computes ``logits = h W^T`` for every position
(``(batch * seq, vocab)``: for SmolLM2's 49,152-token vocabulary at batch 4, seq 512 that is
384 MiB in fp32), upcasts them to fp32 for the loss (another copy under bf16 autocast) and keeps
the log-softmax for backward. :class:`LinearCrossEntropy` computes the same loss a chunk of
rows at a time and, in the same pass, the gradients of the hidden states (and of the head's
weight when it trains), so only one chunk's logits ever exist and backward is a multiply.
Rows whose label is ignored (``-100``: prompts, padding, each row's last position) are dropped
before the head runs: their logits never matter for the loss, and their gradient is zero.

The value is Hugging Face's ``ForCausalLMLoss``: labels shifted left by one, fp32 cross-entropy
over the kept rows (fp64 for a fp64 model, where the stock loss rounds to fp32), summed and divided by ``num_items_in_batch`` when the caller gives it
(the Trainer does, under gradient accumulation), else by the number of kept rows. Under
autocast the head runs in autocast's dtype and the logits are upcast, as the stock model does.

:func:`chunked_forward` runs a supported causal LM this way (see :func:`applies` for when);
the output's ``logits`` is ``None`` (that is the memory saved) and everything else is the
model's own output. It runs when asked for (``PeftModel.chunked_causal_loss = True``; the workbench asks) and ``PEFTLAB_PLAIN=1`` is not set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100  # label value the loss skips (Hugging Face and torch's default)
CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk; 341 rows of a 49,152-token vocabulary
VOCAB_BLOCK = 512  # CPU: head rows per product when computing a chunk's logits (see _logits)

# Causal LMs whose forward computes ``logits = lm_head(last hidden state)`` with nothing after
# it (no soft-capping, no logit scale) and the loss with ``ForCausalLMLoss``; each is checked
# against the stock loss and gradients in tests/test_causal_loss.py. Exact class names: a
# subclass may post-process its logits.
SUPPORTED_CLASSES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"}
)
# Arguments that change which logits exist or how the loss is taken: with them, run the stock path.
# Calls with these arguments take the stock path. ``fused_lm_head`` is trl's (>= 1.x) own fused head:
# it computes per-token log-probabilities from the hidden states and the labels without full logits,
# so there is nothing left to chunk, and it needs the labels passed through.
_STOCK_ONLY_ARGS = ("shift_labels", "logits_to_keep", "output_logits", "return_dict", "ignore_index", "fused_lm_head")


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i W^T + b, t_i) / denom`` over rows ``i``, with gradients computed in forward.

    Shapes: h (n, H), weight (V, H), bias (V,) or None, targets (n,) int64 in [0, V) (ignored
    rows already removed). Per chunk of rows: logits ``z`` (c, V), ``lse = max z + log sum exp(z - max z)``, loss
    ``sum(lse - z[t])``; gradient of the loss w.r.t. ``z`` is ``(softmax(z) - onehot(t)) / denom``,
    turned into ``dh = dz W`` (c, H), ``dW += dz^T h`` and ``db += sum dz``. Saved for backward:
    ``dh`` (the size of ``h``) and, when the head trains, ``dW`` and ``db``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        denom: torch.Tensor,
        chunk_rows: int,
        need_h: bool,
        need_w: bool,
    ) -> torch.Tensor:
        need_b = need_w and bias is not None
        grad_h = torch.empty_like(h) if need_h else None
        loss_dtype = torch.promote_types(h.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=loss_dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=loss_dtype) if need_b else None
        inv = 1.0 / denom.to(loss_dtype)
        total = torch.zeros((), dtype=loss_dtype, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            h_c, t_c = h[start : start + chunk_rows], targets[start : start + chunk_rows]
            z = _logits(h_c, weight, bias).to(loss_dtype)  # z itself in fp32; under autocast the upcast the stock loss does
            # logsumexp and softmax from one exp pass, in place in the chunk's own buffer (torch's
            # logsumexp, then a second exp for the softmax, took 2x as long on a (341, 49152) chunk)
            target = z.gather(1, t_c.unsqueeze(1))  # (c, 1), before z is overwritten
            peak = z.amax(dim=1, keepdim=True)
            e = z.sub_(peak).exp_()
            sums = e.sum(dim=1, keepdim=True)
            total += (peak + sums.log() - target).sum()
            if not (need_h or need_w):
                continue
            # (softmax(z) - onehot(t)) / denom
            dz = e.mul_(inv / sums)
            dz.scatter_add_(1, t_c.unsqueeze(1), (-inv).expand(t_c.shape[0], 1).to(dz.dtype))
            dz_low = dz.to(h.dtype)  # the stock path casts the logits' gradient back to the head's dtype
            if need_h:
                torch.mm(dz_low, weight, out=grad_h[start : start + chunk_rows])
            if need_w and dz_low.dtype == loss_dtype:
                grad_w.addmm_(dz_low.t(), h_c)
            elif need_w:  # a low-precision product, as the stock head's backward, summed in fp32
                grad_w += torch.mm(dz_low.t(), h_c)
            if need_b:
                grad_b += dz.sum(0)
        loss = total * inv
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = None if bool(grad_loss == 1) else grad_loss
        if grad_h is not None and scale is not None:
            grad_h = grad_h * scale.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w if scale is None else grad_w * scale).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b if scale is None else grad_b * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` for one chunk of rows, (c, V).

    On CPU the product runs in blocks of :data:`VOCAB_BLOCK` head rows written into one output:
    a (341, 576) x (576, 49,152) product took 182-197 ms in one call and 142-152 ms in blocks of
    512 (2 threads; 25-40 % faster for other heads too, docs/benchmarks.md). Each logit is the same
    dot product either way; only the BLAS kernel that sums it changes.
    """
    vocab = weight.shape[0]
    if h.device.type != "cpu" or vocab <= 2 * VOCAB_BLOCK:
        return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())
    z = torch.empty((h.shape[0], vocab), dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    for start in range(0, vocab, VOCAB_BLOCK):
        rows, out = weight[start : start + VOCAB_BLOCK], z[:, start : start + VOCAB_BLOCK]
        if bias is None:
            torch.mm(h, rows.t(), out=out)
        else:
            torch.addmm(bias[start : start + VOCAB_BLOCK], h, rows.t(), out=out)
    return z


def chunk_rows_for(vocab: int) -> int:
    """Rows per chunk so one chunk's fp32 logits take about :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss of ``head(hidden)`` against ``labels``, in chunks.

    ``hidden`` (B, T, H) are the states the head reads, ``labels`` (B, T) the unshifted labels
    (``-100`` = ignore). Equal to ``ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch)``
    up to the order of fp32 sums.
    """
    width = hidden.shape[-1]
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the model produced {tuple(hidden.shape[:-1])} "
                         f"positions; give one label per input token (-100 to ignore one).")
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, width).index_select(0, keep)  # (n, H): only rows whose prediction counts
    targets = shifted.index_select(0, keep)
    denom = torch.as_tensor(keep.numel() if num_items_in_batch is None else num_items_in_batch, device=hidden.device)
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and h.dtype in (torch.float32, torch.get_autocast_dtype(device_type)):
        low = torch.get_autocast_dtype(device_type)  # what autocast would run the head in
        h, weight = h.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and h.requires_grad
    need_w = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropy.apply(
            h, weight, bias, targets, denom, chunk_rows or chunk_rows_for(weight.shape[0]), need_h, need_w
        )


# ----- running a model with it ------------------------------------------------------------------
def _plain_head(model: nn.Module) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__:
        return None  # an adapted, quantized or hooked head computes something else
    return head


def applies(model: nn.Module, labels: Any, kwargs: dict[str, Any]) -> bool:
    """Whether :func:`chunked_forward` computes exactly this call's loss (and it is worth it).

    Training mode only: evaluation code reads ``outputs.logits`` next to the loss (metrics,
    accuracy), so evaluation keeps the stock output.
    """
    return (
        os.environ.get("PEFTLAB_PLAIN", "") != "1"
        and model.training
        and type(model).__name__ in SUPPORTED_CLASSES
        and isinstance(labels, torch.Tensor)
        and not labels.is_floating_point()
        and not any(kwargs.get(k) is not None for k in _STOCK_ONLY_ARGS)
        and _plain_head(model) is not None
    )


@contextlib.contextmanager
def _capture_head_input(head: nn.Module, box: list[torch.Tensor]) -> Iterator[None]:
    """The head sees zero positions (so computes no logits); its real input goes into ``box``."""

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        box.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def chunked_forward(model: nn.Module, labels: torch.Tensor, args: tuple, kwargs: dict[str, Any],
                    call: Callable[..., Any] | None = None) -> Any:
    """``model(*args, labels=labels, **kwargs)`` with the loss from :func:`linear_cross_entropy`.

    ``call`` runs the forward (default ``model`` itself; a wrapper that routes adapters around
    ``model`` otherwise). The returned output is the model's own output class with ``loss`` set
    and ``logits=None``. Call only when :func:`applies` is true.
    """
    kwargs = dict(kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    head = _plain_head(model)
    assert head is not None
    box: list[torch.Tensor] = []
    with _capture_head_input(head, box):
        output = (call or model)(*args, **kwargs)
    if len(box) != 1:
        raise RuntimeError(f"{type(model).__name__} called its output head {len(box)} times in one forward; "
                           f"set chunked_causal_loss = False on the PeftModel.")
    loss = linear_cross_entropy(box[0], head, labels, num_items)
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)

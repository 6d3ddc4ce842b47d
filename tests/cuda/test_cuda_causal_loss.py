"""The chunked causal-LM loss on CUDA equals the stock loss, value and gradients (tests/test_causal_loss.py's
problems and tolerances, on the device; ``chunked_causal_loss`` switched on as the workbench does).

On CUDA the logits of a chunk are one product (the vocabulary blocks are a CPU path), so only
the row chunks differ from the stock computation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _cuda import device  # noqa: F401  (the fixture)
from peftlab.causal_loss import linear_cross_entropy
from test_causal_loss import U32, _batch, _lora_model, _loss_and_grads, _problem, _reference, _reference_loss_and_grads

pytestmark = pytest.mark.cuda


def _problem_on(device, **kw):
    hidden, head, labels = _problem(**kw)
    return hidden.detach().to(device).requires_grad_(True), head.to(device), labels.to(device)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("num_items", [None, 40])
def test_value_and_gradients_match_reference_float64(device, chunk_rows, num_items):
    hidden, head, labels = _problem_on(device)
    ours = linear_cross_entropy(hidden, head, labels, num_items, chunk_rows=chunk_rows)
    ours_grads = torch.autograd.grad(ours * 3.0, [hidden, *head.parameters()])
    ref = _reference(hidden, head, labels, num_items)
    ref_grads = torch.autograd.grad(ref * 3.0, [hidden, *head.parameters()])
    assert ours.device.type == device.type and abs(float(ours.detach() - ref.detach())) < 1e-10
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_stock_loss_within_rounding(device, autocast):
    """fp32: ``2 u32 (V + n + 4) max|term|`` (tests/test_causal_loss.py); under autocast the logits may
    differ by one rounding to the autocast dtype each: ``2 u max|z|``, gradients ``2 u sum_v |W_vj| / n``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, head, labels = _problem_on(device, dtype=torch.float32, vocab=97)
    n = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        ours = linear_cross_entropy(hidden, head, labels, chunk_rows=5)
        logits = head(hidden)
        stock = ForCausalLMLoss(logits, labels, vocab_size=97)
    g_ours, g_stock = torch.autograd.grad(ours, hidden)[0], torch.autograd.grad(stock, hidden)[0]
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.float32
    if autocast is None:
        with torch.no_grad():
            z = logits.double()
            max_term = float((torch.logsumexp(z, -1).abs() + z.abs().amax(-1)).max())
        assert abs(float((ours - stock).detach())) <= 2 * U32 * (97 + n + 4) * max_term
        return
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[autocast]
    assert abs(float((ours - stock).detach())) <= 2 * u * float(logits.detach().float().abs().max())
    assert float((g_ours - g_stock).abs().max()) <= 2 * u * float(head.weight.abs().sum(0).max()) / n


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_peft_model_loss_and_gradients_equal_float64(device, name):
    """A LoRA model (dropout 0.1: the fused node's CUDA masks, the same seed in both runs): chunked loss and
    its gradients equal the stock logits' loss in float64."""
    model = _lora_model(name).to(device)
    ids, labels = (t.to(device) for t in _batch())
    model.train()
    ours, g_ours = _loss_and_grads(model, ids, labels, chunked=True)
    assert ours.logits is None and ours.loss.dtype == torch.float64 and ours.loss.device.type == device.type
    ref, g_ref = _reference_loss_and_grads(model, ids, labels)
    assert abs(float(ours.loss - ref)) < 1e-10
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=0, atol=1e-10, msg=n)


def test_fp32_and_bf16_model_loss_match_the_stock_output(device):
    model = _lora_model("llama", torch.float32, dropout=0.0).to(device)
    ids, labels = (t.to(device) for t in _batch())
    model.train()
    ours, _ = _loss_and_grads(model, ids, labels, chunked=True)
    stock, _ = _loss_and_grads(model, ids, labels, chunked=False)
    n = int((labels[:, 1:] != -100).sum())
    max_term = float(stock.logits.abs().amax() * 2 + math.log(99))
    assert abs(float(ours.loss - stock.loss)) <= 2 * U32 * (99 + n + 4) * max_term
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours, g_ours = _loss_and_grads(model, ids, labels, chunked=True)
        stock, g_stock = _loss_and_grads(model, ids, labels, chunked=False)
    assert ours.loss.dtype == torch.float32 and g_ours.keys() == g_stock.keys()
    assert abs(float(ours.loss - stock.loss)) <= 2 * 2.0**-8 * float(stock.logits.float().abs().max())

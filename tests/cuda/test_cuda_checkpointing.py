"""Activation checkpointing on CUDA: every layer method gives the gradients it gives without
checkpointing (tests/test_activation_checkpointing.py's models, on the device), and the fused
node's recomputed dropout masks are the first ones (checkpointing restores the CPU generator the
mask seeds come from, and the CUDA generator of the device).

float64 on the device: the same operations on the same inputs, so 1e-12 leaves room for nothing
but summation order (CUDA's atomics may change it between the two runs)."""

from __future__ import annotations

import pytest
import torch

from _cuda import device  # noqa: F401  (the fixture)
from peftlab import kernels
from test_activation_checkpointing import ALL, METHODS, _batch, _models, _step

pytestmark = pytest.mark.cuda


def _on(device, *models):
    return [m.to(device) for m in models]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("reentrant", "keep_narrow_outputs"), [(False, True), (False, False), (True, False)])
def test_same_gradients_with_and_without_checkpointing(device, method, reentrant, keep_narrow_outputs):
    plain, checkpointed = _on(device, *_models(method))
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant}, keep_narrow_outputs=keep_narrow_outputs)
    batch = {k: v.to(device) for k, v in _batch().items()}
    loss_a, grads_a = _step(plain, batch)
    loss_b, grads_b = _step(checkpointed, batch)
    assert abs(float(loss_a - loss_b)) < 1e-12
    assert grads_a and set(grads_a) == set(grads_b)
    for name in grads_a:
        assert grads_a[name].device.type == device.type
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", ["lora-fused-dropout", "lora-fused-sparse-dropout"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputed_fused_dropout_masks_are_the_first_ones(monkeypatch, device, method, reentrant):
    (model,) = _on(device, _models(method)[1])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    masks: list[torch.Tensor] = []
    real = kernels.DropMask.draw

    def recording(shape, p, where):
        drop = real(shape, p, where)
        assert drop.device.type == device.type
        assert drop.sparse == (device.type == "cpu" and p <= 0.05)  # keep masks on CUDA, whatever p
        masks.append(drop.keep())
        return drop

    monkeypatch.setattr(kernels.DropMask, "draw", recording)
    _step(model, {k: v.to(device) for k, v in _batch().items()})
    per_pass = 2 * len(ALL)  # 2 decoder layers x 7 adapted linears
    assert len(masks) == 2 * per_pass  # forward, then each layer again during backward
    first, again = masks[:per_pass], masks[per_pass:]
    replay = again[len(ALL):] + again[: len(ALL)]  # layers recomputed in reverse, each in forward order
    for a, b in zip(first, replay):
        assert torch.equal(a, b)
    assert any(not torch.equal(first[0], m) for m in first[1:])

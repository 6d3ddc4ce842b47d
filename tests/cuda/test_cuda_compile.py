"""``torch.compile`` of a LoRA model on CUDA: no graph break inside peftlab's code, and a compiled
training step computes what the eager one computes.

With dropout the fused node would draw its mask seed on the host (an ``int`` from torch's CPU
generator) and break the graph at every adapted layer; while compiling, peftlab.kernels leaves
dropout to the readable path's ``nn.Dropout``, which compiles into the graph. Without dropout the
fused node (an autograd.Function) is traced as it is.

The dry run on the CPU (PEFTLAB_TEST_DEVICE=cpu) compiles with the ``aot_eager`` backend: the same
Dynamo graphs and AOTAutograd joint graph, without generating C++ for the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftlab
from _cuda import device, on  # noqa: F401  (the fixture)
from conftest import text_inputs, tiny_llama

pytestmark = pytest.mark.cuda

PEFTLAB_SRC = str(Path(peftlab.__file__).resolve().parent)


def _model(dropout: float, device: torch.device, dtype: torch.dtype = torch.float32) -> peftlab.PeftModel:
    torch.manual_seed(0)
    config = peftlab.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", lora_dropout=dropout,
                                init_lora_weights=False)
    return peftlab.get_peft_model(tiny_llama(), config).to(device=device, dtype=dtype).train()


def _backend(device: torch.device) -> str:
    return "inductor" if device.type == "cuda" else "aot_eager"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_graph_break_inside_peftlab(device, dropout):
    torch._dynamo.reset()
    model = _model(dropout, device)
    inputs = on(device, text_inputs(batch=2, length=8))

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss

    explained = torch._dynamo.explain(forward)(inputs["input_ids"], inputs["attention_mask"])
    ours = [b for b in explained.break_reasons if any(frame.filename.startswith(PEFTLAB_SRC) for frame in b.user_stack)]
    assert not ours, "graph breaks in peftlab:\n" + "\n".join(
        f"{b.reason.splitlines()[0]} at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}" for b in ours)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.slow  # compiles forward and backward (inductor: tens of seconds); --quick leaves it out
def test_compiled_step_equals_eager_float64(device):
    """Without dropout the compiled and eager steps run the same float64 arithmetic, up to the order of
    sums the compiler picks: loss and gradients agree to 1e-10 (a few hundred terms of size <~ 10)."""
    torch._dynamo.reset()
    eager = _model(0.0, device, torch.float64)
    compiled_model = _model(0.0, device, torch.float64)
    compiled = torch.compile(compiled_model, backend=_backend(device), fullgraph=True)
    inputs = on(device, text_inputs(batch=2, length=8))
    results = []
    for model, call in ((eager, eager), (compiled_model, compiled)):
        loss = call(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(float(loss_a - loss_b)) < 1e-10
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_training_with_dropout_learns(device, autocast):
    """A compiled model with dropout trains in one graph (fullgraph=True refuses any break): the loss falls."""
    torch._dynamo.reset()
    model = _model(0.1, device)
    compiled = torch.compile(model, backend=_backend(device), fullgraph=True)
    inputs = on(device, text_inputs(batch=4, length=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = compiled(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

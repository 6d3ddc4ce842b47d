"""Mixed batches with interleaved rows run grouped by adapter and come back in the caller's order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import peftlab
from peftlab import mixed_batch
from tests.conftest import main_output, text_inputs, tiny_bert_cls, tiny_gpt2

INTERLEAVED = ["a", "b", "a", "b", "__base__", "a", "b", "a", "b", "a"]


def test_grouping_order():
    assert mixed_batch.grouping_order(["a", "b", "a", "b", "a", "b"]) == [0, 2, 4, 1, 3, 5]
    assert mixed_batch.grouping_order(["b", "a", "b", "a", "b", "a"]) == [0, 2, 4, 1, 3, 5]  # by first appearance
    assert mixed_batch.grouping_order(["a", "a", "b", "b"]) is None  # already grouped
    assert mixed_batch.grouping_order(["a", "b", "a", "b"]) is None  # two runs per name: the kernel's slices still apply


def test_restore_output_puts_rows_back_and_refuses_what_it_cannot_place():
    order = [0, 2, 1]
    rows = torch.arange(3.0).unsqueeze(1)  # row i holds i
    permuted = rows[order]
    out = SequenceClassifierOutput(loss=torch.tensor(1.5), logits=permuted, hidden_states=(permuted, permuted * 2))
    back = mixed_batch.restore_output(out, order)
    assert isinstance(back, SequenceClassifierOutput)
    assert back.loss.item() == 1.5
    assert torch.equal(back.logits, rows) and torch.equal(back.hidden_states[1], rows * 2)
    assert torch.equal(mixed_batch.restore_output([permuted, None, 3], order)[0], rows)
    assert mixed_batch.restore_output(torch.zeros(2, 3), order) is None  # not batch-first
    assert mixed_batch.restore_output({"x": object()}, order) is None


def two_adapter_bert() -> peftlab.PeftModel:
    torch.manual_seed(0)
    model = peftlab.get_peft_model(
        tiny_bert_cls(), peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", peftlab.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"], init_lora_weights=False))
    return model.eval()


def per_row_reference(model: peftlab.PeftModel, inputs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(main_output(model(**row)))
        else:
            model.set_adapter(name)
            rows.append(main_output(model(**row)))
    return torch.cat(rows)


def test_interleaved_rows_run_grouped_and_return_in_order(monkeypatch):
    model = two_adapter_bert()
    inputs = text_inputs(batch=len(INTERLEAVED))
    seen_rows = []
    real = peftlab.layers.mixed_lora_forward

    def spy(base, x, rows, adapters, **kw):
        seen_rows.append(list(rows))
        return real(base, x, rows, adapters, **kw)

    monkeypatch.setattr("peftlab.layers.mixed_lora_forward", spy)
    with torch.no_grad():
        out = model(**inputs, adapter_names=INTERLEAVED, output_hidden_states=True)
        expected = per_row_reference(model, inputs, INTERLEAVED)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    # The layers saw the rows grouped by adapter, in order of first appearance.
    assert seen_rows and all(rows == ["a"] * 5 + ["b"] * 4 + ["__base__"] for rows in seen_rows)
    # Hidden states come back in the caller's order too: row 4 (base) equals the bare model's.
    with torch.no_grad(), model.disable_adapter():
        bare = model(**{k: v[4:5] for k, v in inputs.items()}, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1][4:5], bare.hidden_states[-1], rtol=1e-5, atol=1e-6)


def test_loss_with_labels_matches_the_caller_order_loss():
    model = two_adapter_bert()
    inputs = text_inputs(batch=len(INTERLEAVED))
    labels = torch.tensor([i % 2 for i in range(len(INTERLEAVED))])
    with torch.no_grad():
        out = model(**inputs, labels=labels, adapter_names=INTERLEAVED)
        expected_logits = per_row_reference(model, inputs, INTERLEAVED)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(expected_logits, labels), rtol=1e-5, atol=1e-6)


def test_models_with_a_cache_keep_the_caller_order_unless_use_cache_is_false(monkeypatch):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(tiny_gpt2(), peftlab.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.eval()
    assert mixed_batch.takes_cache(model.get_base_model())
    called = []
    monkeypatch.setattr(mixed_batch, "permute_inputs", lambda *a: called.append(1) or a[:2])
    names = ["a", "b", "a", "b", "a", "b"]
    inputs = text_inputs(batch=len(names))
    with torch.no_grad():
        out = model(**inputs, adapter_names=names)
        expected = per_row_reference(model, inputs, names)
    assert not called
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    # Without a cache in or out (use_cache=False), the rows are regrouped like an encoder's.
    seen_rows = []
    real = peftlab.layers.mixed_lora_forward
    monkeypatch.setattr("peftlab.layers.mixed_lora_forward", lambda base, x, rows, *a, **k: seen_rows.append(list(rows)) or real(base, x, rows, *a, **k))
    with torch.no_grad():
        out = model(**inputs, adapter_names=names, use_cache=False)
    assert out.past_key_values is None
    assert seen_rows and all(rows == ["a"] * 3 + ["b"] * 3 for rows in seen_rows)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)


class OddOutput(nn.Module):
    """A model whose output cannot be put back in order (an opaque object)."""

    class Box:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        return self.Box(self.lin(x))


def test_unrestorable_output_runs_again_in_the_caller_order():
    torch.manual_seed(0)
    model = peftlab.get_peft_model(OddOutput(), peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.eval()
    names = ["a", "b", "a", "b", "a", "b"]
    x = torch.randn(6, 6)
    with torch.no_grad():
        out = model(x, adapter_names=names)
        expected = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            expected.append(model(x[i : i + 1]).value)
    assert model.get_base_model().calls == 2 + len(names)  # grouped try, the caller-order run, then the references
    torch.testing.assert_close(out.value, torch.cat(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a"] * 3])
def test_short_or_uniform_batches_are_left_alone(names):
    assert mixed_batch.grouping_order(names) is None


def test_dict_subclasses_it_does_not_know_are_not_restored():
    from collections import defaultdict

    order = [1, 0, 2]
    out = defaultdict(list, {"x": torch.zeros(3, 2)})
    assert mixed_batch.restore_output(out, order) is None
    assert torch.equal(mixed_batch.restore_output({"x": torch.arange(3)}, order)["x"], torch.tensor([1, 0, 2]))


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: peftlab.IA3Config(init_ia3_weights=False),
        lambda: peftlab.LoHaConfig(r=2, target_modules=["query", "value"], init_weights=False),
        lambda: peftlab.LoKrConfig(r=2, target_modules=["query", "value"], init_weights=False),
        lambda: peftlab.BottleneckConfig(init_weights=False),
        lambda: peftlab.LoraConfig(r=2, target_modules=["query"], use_dora=True, init_lora_weights=False),
    ],
    ids=["ia3", "loha", "lokr", "bottleneck", "dora"],
)
def test_mixed_batched_mixed_batches_for_every_layer_method(make_config):
    """Regrouping happens at the model input, so it applies to every layer method's mixed batches."""
    torch.manual_seed(0)
    model = peftlab.get_peft_model(tiny_bert_cls(), make_config(), adapter_name="a")
    model.add_adapter("b", make_config())
    with torch.no_grad():  # make b differ from a
        for name, param in model.named_parameters():
            if ".b." in name or name.endswith(".b"):
                param.add_(torch.randn_like(param) * 0.3)
    model.eval()
    assert mixed_batch.grouping_order(INTERLEAVED) is not None
    inputs = text_inputs(batch=len(INTERLEAVED))
    with torch.no_grad():
        out = model(**inputs, adapter_names=INTERLEAVED).logits
        expected = per_row_reference(model, inputs, INTERLEAVED)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class ScaledLinear(nn.Module):
    """forward(x, scale): ``scale`` is not per-row, though its length can equal the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * scale.sum()


def test_inputs_that_may_not_be_per_row_keep_the_caller_order(monkeypatch):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(ScaledLinear(), peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.eval()
    names = ["a", "b", "a", "b", "a", "b"]
    x, scale = torch.randn(6, 6), torch.arange(6.0)  # len(scale) == batch size, by coincidence
    seen_rows = []
    real = peftlab.layers.mixed_lora_forward
    monkeypatch.setattr("peftlab.layers.mixed_lora_forward", lambda base, x, rows, *a, **k: seen_rows.append(list(rows)) or real(base, x, rows, *a, **k))
    with torch.no_grad():
        out = model(x, scale=scale, adapter_names=names)
    assert seen_rows == [names]  # not regrouped
    assert mixed_batch.permute_inputs((x,), {"scale": scale}, [0, 2, 4, 1, 3, 5], 6) is None
    assert mixed_batch.permute_inputs((x,), {"scale": scale[:2]}, [0, 2, 4, 1, 3, 5], 6) is not None
    # Row i alone and row i inside the batch of 6 may take different fp32 kernels (gemv / gemm,
    # MKL / oneDNN / default ATen), which sum in different orders. Each output element sums 6
    # input terms, the bias and r=2 LoRA terms (9 terms); fp32 rounding of an n-term sum is at
    # most n * eps * (sum of |terms|) per side. The sum of |terms| is the same model run in fp64
    # on absolute weights and inputs.
    eps, n_terms = torch.finfo(torch.float32).eps, 6 + 1 + 2
    magnitudes = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in magnitudes.parameters():
            p.abs_()
        for i, name in enumerate(names):
            model.set_adapter(name)
            magnitudes.set_adapter(name)
            single = model(x[i : i + 1], scale=scale)
            bound = 2 * n_terms * eps * magnitudes(x[i : i + 1].double().abs(), scale=scale.double().abs()).float()
            error = (out[i : i + 1] - single).abs()
            assert (error <= bound).all(), f"row {i}: error {error.max():.3g} above the fp32 bound {bound.min():.3g}"


def test_a_passed_cache_is_never_reordered():
    bert = tiny_bert_cls()  # its forward names no cache; one could still arrive through **kwargs
    assert mixed_batch.safe_to_reorder(bert, {})
    assert not mixed_batch.safe_to_reorder(bert, {"past_key_values": object()})
    gpt2 = tiny_gpt2()
    assert not mixed_batch.safe_to_reorder(gpt2, {})
    assert mixed_batch.safe_to_reorder(gpt2, {"use_cache": False})
    assert not mixed_batch.safe_to_reorder(gpt2, {"use_cache": False, "past_key_values": object()})


def test_takes_cache_reads_the_class_or_the_instance_forward():
    class NoCache(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    class WithCache(nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert not mixed_batch.takes_cache(NoCache()) and mixed_batch.takes_cache(WithCache())
    patched = NoCache()
    patched.forward = lambda input_ids, use_cache=None: input_ids  # set on the instance: it decides
    assert mixed_batch.takes_cache(patched)
    unpatched = WithCache()
    unpatched.forward = lambda input_ids: input_ids
    assert not mixed_batch.takes_cache(unpatched)

    class Opaque:  # a signature that cannot be read counts as "may take a cache"
        __signature__ = "not a signature"

        def __call__(self):
            return None

    assert mixed_batch._signature_takes_cache(Opaque())


def test_safe_to_reorder_refuses_any_passed_cache():
    class NoCache(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    model = NoCache()
    assert mixed_batch.safe_to_reorder(model, {})
    assert not mixed_batch.safe_to_reorder(model, {"cache": object()})  # through **kwargs
    assert not mixed_batch.safe_to_reorder(model, {"past_key_values": object()})


def test_permute_inputs_refuses_extra_positional_batch_tensors_and_keeps_scalars():
    order, batch = [1, 0, 2], 3
    ids = torch.arange(3).unsqueeze(1)
    args, kwargs = mixed_batch.permute_inputs((ids,), {"temperature": torch.tensor(0.5)}, order, batch)
    assert torch.equal(args[0], ids[order]) and kwargs["temperature"].item() == 0.5  # a 0-dim tensor stays
    assert mixed_batch.permute_inputs((ids, torch.zeros(3, 4)), {}, order, batch) is None  # second positional: ambiguous
    assert mixed_batch.permute_inputs((ids, torch.zeros(5)), {}, order, batch) is not None


def test_restore_output_keeps_non_string_dict_keys():
    order = [1, 0]
    permuted = torch.tensor([[1.0], [0.0]])
    restored = mixed_batch.restore_output({0: permuted, "x": permuted}, order)
    assert type(restored) is dict and torch.equal(restored[0], torch.tensor([[0.0], [1.0]]))

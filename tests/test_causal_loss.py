"""The chunked causal-LM loss equals Hugging Face's, value and gradients, and never builds full logits.

Tolerances. In float64 the chunked loss and the reference below compute the same formula in
float64 (only the order of sums differs): 1e-10. Against the stock fp32 loss: each of the ``n``
kept rows contributes ``lse - z_t``; a logsumexp over ``V`` fp32 terms is exact to about
``(V + 2) u |term|`` and the fp32 sum of ``n`` terms adds ``n u`` times their size, so
``|diff| <= 2 u (V + n + 4) max|term|`` with ``u = 2**-24``. Under bf16 autocast the two
paths' logits may differ by one bf16 rounding (``2**-8 |z|``) per element (blocked fp32
accumulation in both, then a bf16 round), so ``|diff| <= 2 * 2**-8 * max|z|``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from peftlab import LoraConfig, get_peft_model
from peftlab import causal_loss
from peftlab.causal_loss import LinearCrossEntropy, applies, linear_cross_entropy

U32 = 2.0**-24


def _reference(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """ForCausalLMLoss written out, in the inputs' own dtype (no fp32 rounding)."""
    logits = head(hidden)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction=reduction)
    return loss if num_items is None else loss / num_items


def _problem(dtype=torch.float64, bias=True, vocab=37, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g, dtype=dtype))
    hidden = torch.randn(3, 11, width, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    return hidden, head, labels


@pytest.fixture(params=["one product", "vocabulary blocks"])
def vocab_block(request, monkeypatch):
    """Logits in one product (37 tokens < 2 blocks), or in blocks of 8 head rows (the last one partial),
    the CPU path a large vocabulary takes."""
    if request.param == "vocabulary blocks":
        monkeypatch.setattr(causal_loss, "VOCAB_BLOCK", 8)
    return request.param


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("num_items", [None, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_all_gradients_match_reference_float64(chunk_rows, num_items, bias, vocab_block):
    hidden, head, labels = _problem(bias=bias)
    ours = linear_cross_entropy(hidden, head, labels, num_items, chunk_rows=chunk_rows)
    ours_grads = torch.autograd.grad(ours * 3.0, [hidden, *head.parameters()])  # grad_output != 1 too
    ref = _reference(hidden, head, labels, num_items)
    ref_grads = torch.autograd.grad(ref * 3.0, [hidden, *head.parameters()])
    assert ours.dtype == torch.float64
    assert abs(float(ours.detach() - ref.detach())) < 1e-10
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_gradcheck():
    hidden, head, labels = _problem(vocab=7, width=3)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    keep = (shifted != -100).nonzero().squeeze(1)
    h = hidden.detach().reshape(-1, 3)[keep].requires_grad_()
    def fn(h, w, b):
        return LinearCrossEntropy.apply(h, w, b, shifted[keep], torch.tensor(float(keep.numel())), 2, True, True)

    assert torch.autograd.gradcheck(fn, (h, head.weight, head.bias))


def test_fp32_matches_stock_loss_within_rounding(vocab_block):
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, head, labels = _problem(dtype=torch.float32, vocab=97)
    ours = linear_cross_entropy(hidden, head, labels, chunk_rows=5)
    stock = ForCausalLMLoss(head(hidden), labels, vocab_size=97)
    n = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    with torch.no_grad():
        z = head(hidden.double().float()).double()
        max_term = float((torch.logsumexp(z, -1).abs() + z.abs().amax(-1)).max())
    assert abs(float(ours - stock)) <= 2 * U32 * (97 + n + 4) * max_term


def test_bf16_autocast_matches_stock_loss_within_one_rounding(vocab_block):
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, head, labels = _problem(dtype=torch.float32, vocab=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, head, labels, chunk_rows=5)
        logits = head(hidden)
        stock = ForCausalLMLoss(logits, labels, vocab_size=97)
    g_ours = torch.autograd.grad(ours, hidden)[0]
    g_stock = torch.autograd.grad(stock, hidden)[0]
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.float32
    assert abs(float(ours - stock)) <= 2 * 2.0**-8 * float(logits.float().abs().max())
    # gradients: softmax - onehot is in [-1, 1], rounded to bf16 (2**-8) before the bf16 matmul
    # with W; each of V products then rounds once more: per element <= 2 * 2**-8 * sum_v |W_vj| / n.
    n = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    bound = 2 * 2.0**-8 * float(head.weight.abs().sum(0).max()) / n
    assert float((g_ours - g_stock).abs().max()) <= bound


def _tiny(name):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    small = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": tiny_llama,
        "gpt2": tiny_gpt2,
        "mistral": lambda: MistralForCausalLM(MistralConfig(**small)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**small)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **small)),
    }[name]()


def _lora_model(name, dtype=torch.float64, dropout=0.1):
    torch.manual_seed(0)
    base = _tiny(name)
    targets = ["c_attn", "c_proj", "c_fc"] if name == "gpt2" else "all-linear"
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=False)
    model = get_peft_model(base, config).to(dtype)
    model.chunked_causal_loss = True  # asked for, as the workbench asks
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, 9:] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, chunked, seed=3, **kw):
    model.chunked_causal_loss = chunked
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # model and adapter dropout draw the same numbers in both runs
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference_loss_and_grads(model, ids, labels, seed=3):
    """The stock model's logits, its loss formula in float64, the same dropout draws."""
    model.chunked_causal_loss = False
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 99), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    return ref, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral", "qwen2", "qwen3"])
def test_peft_model_loss_and_gradients_equal_float64(name):
    model = _lora_model(name)
    ids, labels = _batch()
    model.train()
    ours, g_ours = _loss_and_grads(model, ids, labels, chunked=True)
    assert ours.logits is None and ours.loss.dtype == torch.float64
    ref, g_ref = _reference_loss_and_grads(model, ids, labels)
    assert abs(float(ours.loss - ref)) < 1e-10
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fp32_loss_matches_stock_output(name):
    model = _lora_model(name, torch.float32)
    ids, labels = _batch()
    model.train()
    ours, _ = _loss_and_grads(model, ids, labels, chunked=True)
    stock, _ = _loss_and_grads(model, ids, labels, chunked=False)
    assert stock.logits is not None
    n = int((labels[:, 1:] != -100).sum())
    max_term = float(stock.logits.abs().amax() * 2 + math.log(99))
    assert abs(float(ours.loss - stock.loss)) <= 2 * U32 * (99 + n + 4) * max_term


def test_num_items_in_batch_divides_the_sum():
    model = _lora_model("llama", dropout=0.0)
    ids, labels = _batch()
    model.train()
    mean = model(input_ids=ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    assert abs(float(summed * 2 - mean)) < 1e-12


def test_off_unless_asked_for_so_a_training_forward_returns_logits_as_peft():
    torch.manual_seed(0)
    model = get_peft_model(_tiny("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    ids, labels = _batch()
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 12, 99) and out.loss is not None


def test_when_it_applies():
    model = _lora_model("llama", dropout=0.0)
    ids, labels = _batch()
    model.train()
    assert model(input_ids=ids, labels=labels).logits is None
    model.eval()  # evaluation reads logits next to the loss
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 12, 99)
    model.train()
    model.chunked_causal_loss = False
    assert model(input_ids=ids, labels=labels).logits is not None
    model.chunked_causal_loss = True
    assert model(input_ids=ids, labels=labels, return_dict=True).logits is not None  # stock-only arguments
    assert model(input_ids=ids).logits is not None  # no labels
    base = model.get_base_model()
    assert applies(base, labels, {})
    assert not applies(base, labels.float(), {})


def test_plain_env_turns_it_off(monkeypatch):
    model = _lora_model("llama", dropout=0.0)
    ids, labels = _batch()
    model.train()
    monkeypatch.setenv("PEFTLAB_PLAIN", "1")
    assert model(input_ids=ids, labels=labels).logits is not None


def test_unsupported_models_keep_the_stock_path():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, num_labels=2)
    model = get_peft_model(LlamaForSequenceClassification(cfg), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
    model.train()
    ids, _ = _batch()
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2)  # a classifier: labels mean something else


def test_no_full_vocabulary_tensor_is_kept_for_backward():
    model = _lora_model("llama", torch.float32, dropout=0.1)
    ids, labels = _batch()
    model.train()
    rows = ids.numel()
    widest = []

    def pack(t):
        widest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    embedding = 99 * 32  # the tied embedding weight is saved by the embedding lookup, as in the stock path
    assert max(n for n in widest if n != embedding) < rows * 99
    loss.backward()


def test_trainable_tied_head_gets_the_weight_gradient():
    model = _lora_model("llama", dropout=0.0)
    head = model.get_base_model().lm_head
    head.weight.requires_grad_(True)  # e.g. trained in full next to the adapters
    ids, labels = _batch()
    model.train()
    _, ours = _loss_and_grads(model, ids, labels, chunked=True)
    _, ref = _reference_loss_and_grads(model, ids, labels)
    assert any(n.endswith("lm_head.weight") for n in ours)
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=0, atol=1e-10, msg=n)


def test_prompt_methods_keep_the_stock_loss():
    from peftlab import PromptTuningConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, labels = _batch()
    model.train()
    out = model(input_ids=ids, labels=labels)  # labels are padded for the virtual tokens by the prompt method
    assert out.logits is not None and out.logits.shape == (3, 15, 99) and torch.isfinite(out.loss)


def test_labels_of_the_wrong_length_are_refused():
    model = _lora_model("llama", dropout=0.0)
    ids, labels = _batch()
    model.train()
    with pytest.raises(ValueError, match="one label per input token"):
        model(input_ids=ids, labels=labels[:, :-2])


def test_bf16_autocast_model_loss_within_one_rounding_of_the_stock_loss():
    model = _lora_model("llama", torch.float32, dropout=0.0)
    ids, labels = _batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, g_ours = _loss_and_grads(model, ids, labels, chunked=True)
        stock, g_stock = _loss_and_grads(model, ids, labels, chunked=False)
    assert ours.loss.dtype == torch.float32 and g_ours.keys() == g_stock.keys()
    # same bf16 forward up to the head; the head's logits may differ by one bf16 rounding each
    assert abs(float(ours.loss - stock.loss)) <= 2 * 2.0**-8 * float(stock.logits.float().abs().max())


def test_vocabulary_blocks_write_every_logit_once():
    """The blocked product covers the whole vocabulary (a partial last block included) and equals h W^T + b."""
    g = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(5, 6), (2 * 512 + 77, 6), (2 * 512 + 77,)])
    for bias in (None, b):
        z = causal_loss._logits(h, w, bias)
        expected = h @ w.t() + (0 if bias is None else bias)
        assert z.shape == expected.shape
        torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)  # 6 fp64 terms of size <~ 20

"""Trainable tokens (TrainableTokensConfig, and LoraConfig(trainable_token_indices=...)): the contract
table, the forward against the replaced table by hand, tied output heads, peft's file layout, and
refusals that leave the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab import LoraConfig, PeftConfigError, TargetModuleError, TrainableTokensConfig, get_peft_model
from _contract import Case, contract_tests
from conftest import main_output, text_inputs, tiny_gpt2, tiny_llama

EPS = torch.finfo(torch.float32).eps
ROWS = [3, 10, 56, 90]  # tokens that occur in text_inputs() (and 0, 1, 2, which do not, stay as they were)
LORA_DICT = {"embed_tokens": ROWS}


def _tt(**kwargs):
    def ours(identity: bool):
        return TrainableTokensConfig(token_indices=ROWS, init_weights=identity, **kwargs)

    def theirs():
        import peft

        return peft.TrainableTokensConfig(token_indices=ROWS, init_weights=False, **kwargs)

    return ours, theirs


def _lora(targets, indices):
    def ours(identity: bool):
        return LoraConfig(r=2, target_modules=targets, trainable_token_indices=indices, init_lora_weights=identity)

    def theirs():
        import peft

        return peft.LoraConfig(r=2, target_modules=targets, trainable_token_indices=indices, init_lora_weights=False)

    return ours, theirs


CASES = {
    "llama-tokens": Case(tiny_llama, text_inputs, *_tt()),
    "gpt2-tied-tokens": Case(tiny_gpt2, text_inputs, *_tt()),
    # LoRA's rows start as the table's rows whatever init_lora_weights says, so they are perturbed.
    "llama-lora-tokens": Case(tiny_llama, text_inputs, *_lora(["q_proj", "v_proj"], ROWS), perturb=True),
    "llama-lora-token-dict": Case(tiny_llama, text_inputs, *_lora(["q_proj"], LORA_DICT), perturb=True),
    "gpt2-tied-lora-tokens": Case(tiny_gpt2, text_inputs, *_lora(["c_attn"], ROWS), perturb=True),
}
globals().update(contract_tests(CASES))


def _run(model, inputs):
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def _set_rows(model, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    embedding = model.get_base_model().get_input_embeddings()
    rows = torch.randn(len(ROWS), embedding.base_layer.embedding_dim, generator=g)
    with torch.no_grad():
        embedding.adapters["default"].trainable_tokens_delta.copy_(rows)
    return rows


def test_embedding_output_is_the_table_with_rows_replaced():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = get_peft_model(copy.deepcopy(base), TrainableTokensConfig(token_indices=ROWS))
    rows = _set_rows(model)
    ids = text_inputs()["input_ids"]
    table = base.get_input_embeddings().weight.detach().clone()
    table[ROWS] = rows
    embedding = model.get_base_model().get_input_embeddings()
    with torch.no_grad():
        assert torch.equal(embedding(ids), F.embedding(ids, table))  # a lookup either way: no rounding
    assert not embedding.base_layer.weight.requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(len(ROWS), 32)]  # the rows only, not the table


def test_tied_head_uses_the_trained_rows():
    """GPT-2's lm_head is the embedding's weight: the chosen output units follow the trained rows."""
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    model = get_peft_model(copy.deepcopy(base), TrainableTokensConfig(token_indices=ROWS))
    rows = _set_rows(model)
    head = model.get_base_model().lm_head
    assert head.adapters["default"].rows() is model.get_base_model().transformer.wte.adapters["default"].trainable_tokens_delta
    x = torch.randn(2, 5, 32)
    table = base.lm_head.weight.detach().clone()
    table[ROWS] = rows
    with torch.no_grad():
        out = head(x)
    expected = x @ table.T
    # each logit sums 32 products either way, in another order: 32 roundings of |x||w| at most
    bound = 32 * EPS * float((x.abs() @ table.abs().T).max())
    torch.testing.assert_close(out, expected, atol=bound, rtol=0)
    assert len([p for p in model.parameters() if p.requires_grad]) == 1  # one tensor, shared


@pytest.mark.parametrize("kind", ["method", "lora"])
def test_files_hold_the_keys_peft_writes(kind, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_gpt2()
    if kind == "method":
        configs = peft.TrainableTokensConfig(token_indices=ROWS), TrainableTokensConfig(token_indices=ROWS)
    else:
        configs = (peft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=ROWS),
                   LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=ROWS))
    peft.get_peft_model(copy.deepcopy(base), configs[0]).save_pretrained(tmp_path / "theirs")
    get_peft_model(copy.deepcopy(base), configs[1]).save_pretrained(tmp_path / "ours")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in [k for k in theirs if "trainable_tokens" in k]:
        assert torch.equal(ours[key], theirs[key]), key  # init rows are copies of the same table
    theirs_config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(theirs_config).__name__ == type(configs[0]).__name__


def test_merge_writes_rows_into_a_tied_table_without_untying():
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    model = get_peft_model(copy.deepcopy(base), TrainableTokensConfig(token_indices=ROWS))
    rows = _set_rows(model)
    inputs = text_inputs()
    expected = _run(model, inputs)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied, as in peft
    assert torch.equal(merged.transformer.wte.weight[ROWS], rows)
    bound = 64 * EPS * float(expected.abs().max())  # the head's 32-term sums, each side in its own order
    torch.testing.assert_close(_run(merged, inputs), expected, atol=bound, rtol=0)


# ----- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("indices", [[], [-1], [1, 1], [True], "3", [1.0]])
def test_bad_indices_are_refused(indices):
    with pytest.raises(PeftConfigError, match="token indices"):
        TrainableTokensConfig(token_indices=indices)
    with pytest.raises(PeftConfigError, match="token indices"):
        LoraConfig(trainable_token_indices=indices if indices != [] else {"embed_tokens": []})


def _unchanged(model, snapshot):
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("config,error,match", [
    (TrainableTokensConfig(token_indices=[3, 99]), TargetModuleError, "beyond the 99 rows"),
    (LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"nowhere": [1]}), TargetModuleError, "matches no module"),
    (LoraConfig(r=2, target_modules=["embed_tokens"], trainable_token_indices=[1]), TargetModuleError, "adapted by this LoRA"),
    (LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
     PeftConfigError, "modules_to_save"),
])
def test_refusals_leave_the_model_untouched(config, error, match):
    torch.manual_seed(0)
    base = tiny_llama()
    snapshot = copy.deepcopy(base.state_dict())
    with pytest.raises(error, match=match):
        get_peft_model(base, config)
    _unchanged(base, snapshot)


def test_tied_head_named_with_other_rows_is_refused():
    with pytest.raises(PeftConfigError, match="same token indices"):
        get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices={"wte": [1], "lm_head": [2]}))


def test_adalora_refuses_trainable_tokens():
    with pytest.raises(PeftConfigError, match="trainable_token_indices"):
        peftlab.AdaLoraConfig(total_step=10, trainable_token_indices=[1])

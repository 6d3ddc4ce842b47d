"""P-tuning (MLP and LSTM prompt encoders): the prompt contract table plus Trainer and bad-input checks."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PromptEncoderConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, peft_oracle


def _pair(task: str, **kwargs):
    return (lambda: PromptEncoderConfig(task_type=task, **kwargs), lambda: peft_oracle().PromptEncoderConfig(task_type=task, **kwargs))


MLP = dict(num_virtual_tokens=4, encoder_hidden_size=16)
LSTM = dict(num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM")

CASES = {
    "bert-seq-cls-mlp": PromptCase(tiny_bert_cls, text_inputs, *_pair("SEQ_CLS", **MLP)),
    "roberta-seq-cls-lstm": PromptCase(tiny_roberta, text_inputs, *_pair("SEQ_CLS", **LSTM)),
    "gpt2-causal-mlp": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **MLP), generates=True),
    "gpt2-causal-lstm": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **LSTM), generates=True),
    "llama-causal-mlp": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", **MLP), generates=True),
    "t5-seq2seq-lstm": PromptCase(tiny_t5, seq2seq_inputs, *_pair("SEQ_2_SEQ_LM", **LSTM), generates=True),
}
globals().update(prompt_contract_tests(CASES))


def test_trainer_seq_cls(tmp_path):
    from _prompt_contract import check_trainer_trains

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16))
    check_trainer_trains(model, tmp_path)


def test_token_type_ids_match_peft():
    from _prompt_contract import run, twin_models

    _, theirs, ours = twin_models(CASES["bert-seq-cls-mlp"])
    inputs = text_inputs()
    inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    torch.testing.assert_close(run(ours, inputs), run(theirs, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_loaded_adapter_keeps_its_outputs_when_trained_further(kind, tmp_path):
    """The file holds the encoder's output; resuming training continues from that table, same outputs."""
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                     encoder_reparameterization_type=kind)).eval()
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    inputs = text_inputs()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), "not known; use 'MLP' or 'LSTM'"),
        (dict(num_virtual_tokens=4, encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
        (dict(num_virtual_tokens=4, encoder_dropout=1.5), "encoder_dropout must be in"),
        (dict(num_virtual_tokens=4, encoder_num_layers=0), "encoder_num_layers must be a positive integer"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(PeftConfigError, match=match):
        PromptEncoderConfig(task_type="CAUSAL_LM", **kwargs)


def test_unsupported_task_type_is_rejected():
    with pytest.raises(PeftConfigError, match="not supported by prompt methods"):
        PromptEncoderConfig(task_type="TOKEN_CLS", num_virtual_tokens=4)


def test_peft_config_file_round_trip(tmp_path):
    peft = peft_oracle()

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, encoder_reparameterization_type="LSTM",
                                 encoder_hidden_size=12, encoder_num_layers=3, encoder_dropout=0.1)
    config.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert (theirs.num_virtual_tokens, theirs.encoder_reparameterization_type, theirs.encoder_hidden_size,
            theirs.encoder_num_layers, theirs.encoder_dropout) == (7, "LSTM", 12, 3, 0.1)
    theirs.save_pretrained(tmp_path / "back")
    assert peftlab.PeftConfig.from_pretrained(tmp_path / "back") == config

"""P-tuning (MLP and LSTM prompt encoders): the prompt contract table plus Trainer and bad-input checks."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PromptEncoderConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5


def _pair(task: str, **kwargs):
    import peft

    return (lambda: PromptEncoderConfig(task_type=task, **kwargs), lambda: peft.PromptEncoderConfig(task_type=task, **kwargs))


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

"""Prompt tuning: the prompt contract table (parity with peft, checkpoints both ways, training)
plus TEXT init, Trainer and bad-input checks."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PromptTuningConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5


def _pair(task: str, **kwargs):
    import peft

    return (lambda: PromptTuningConfig(task_type=task, **kwargs), lambda: peft.PromptTuningConfig(task_type=task, **kwargs))


CASES = {
    "bert-seq-cls": PromptCase(tiny_bert_cls, text_inputs, *_pair("SEQ_CLS", num_virtual_tokens=4)),
    "roberta-seq-cls": PromptCase(tiny_roberta, text_inputs, *_pair("SEQ_CLS", num_virtual_tokens=3)),
    "gpt2-causal": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", num_virtual_tokens=4), generates=True),
    "llama-causal": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", num_virtual_tokens=5), generates=True),
    "t5-seq2seq": PromptCase(tiny_t5, seq2seq_inputs, *_pair("SEQ_2_SEQ_LM", num_virtual_tokens=3), generates=True),
}
globals().update(prompt_contract_tests(CASES))

"""Prefix tuning (with and without projection): the prompt contract table plus cache, Trainer and
bad-input checks."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PrefixTuningConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5


def _pair(task: str, **kwargs):
    import peft

    return (lambda: PrefixTuningConfig(task_type=task, **kwargs), lambda: peft.PrefixTuningConfig(task_type=task, **kwargs))


PLAIN = dict(num_virtual_tokens=4)
PROJ = dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)

CASES = {
    "bert-seq-cls": PromptCase(tiny_bert_cls, text_inputs, *_pair("SEQ_CLS", **PLAIN)),
    "roberta-seq-cls-projection": PromptCase(tiny_roberta, text_inputs, *_pair("SEQ_CLS", **PROJ)),
    "gpt2-causal": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **PLAIN), generates=True),
    "gpt2-causal-projection": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", **PROJ), generates=True),
    "llama-gqa-causal": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", **PLAIN), generates=True),
    "llama-gqa-causal-projection": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", **PROJ), generates=True),
    "t5-seq2seq": PromptCase(tiny_t5, seq2seq_inputs, *_pair("SEQ_2_SEQ_LM", **PLAIN), generates=True),
}
globals().update(prompt_contract_tests(CASES))

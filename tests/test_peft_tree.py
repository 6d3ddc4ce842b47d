"""peft's module tree: the same ``state_dict()`` / ``named_parameters()`` keys, in the same order.

Users filter parameters by name, build FSDP wrap policies from module paths and load a peft
``state_dict`` straight into the model, so for every method both libraries have, on tiny BERT,
GPT-2, Llama and T5: the key lists are equal, and a state dict moves strictly both ways with
equal outputs afterwards (fp32; the adapter tensors are randomised first so loading them matters).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftlab
from conftest import main_output, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")

MODELS = {
    "bert": (tiny_bert_cls, text_inputs, "SEQ_CLS"),
    "gpt2": (tiny_gpt2, text_inputs, "CAUSAL_LM"),
    "llama": (tiny_llama, text_inputs, "CAUSAL_LM"),
    "t5": (tiny_t5, seq2seq_inputs, "SEQ_2_SEQ_LM"),
}
# method -> (config class name, kwargs shared by both libraries); target_modules left to each
# library's defaults for the model type unless given.
METHODS = {
    "lora": ("LoraConfig", dict(r=2, lora_alpha=4)),
    "dora": ("LoraConfig", dict(r=2, use_dora=True)),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", dict(r=2)),
    "lokr": ("LoKrConfig", dict(r=2)),
    "adalora": ("AdaLoraConfig", dict(init_r=4, target_r=2, total_step=10)),
    "prompt_tuning": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "prefix_tuning": ("PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "p_tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8)),
}
PROMPT_METHODS = {"prompt_tuning", "prefix_tuning", "p_tuning"}
# GPT-2's projections are Conv1D, which neither library's LoHa / LoKr adapts.
SKIP = {("gpt2", "loha"), ("gpt2", "lokr")}
EXTRA = {"gpt2": dict(fan_in_fan_out=True)}  # LoRA-family and IA3 configs on Conv1D
CASES = [f"{m}-{k}" for m in MODELS for k in METHODS if (m, k) not in SKIP] + ["gpt2-lora-embedding"]


def build(case: str):
    model_name, method = case.split("-", 1)
    builder, make_inputs, task = MODELS[model_name]
    if method == "lora-embedding":
        cls_name, kwargs = "LoraConfig", dict(r=2, target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    else:
        cls_name, kwargs = METHODS[method]
        kwargs = dict(kwargs)
        if cls_name in ("LoraConfig", "IA3Config", "AdaLoraConfig"):
            kwargs.update(EXTRA.get(model_name, {}))
    torch.manual_seed(0)
    base = builder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peftlab.get_peft_model(copy.deepcopy(base), getattr(peftlab, cls_name)(task_type=task, **kwargs))
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls_name)(task_type=task, **kwargs))
    return ours, theirs, make_inputs()


def randomize_trainable(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("case", CASES)
def test_keys_equal_peft(case):
    ours, theirs, _ = build(case)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    # peft's tree: the tuner's .model is the user's model; prompt methods keep it as base_model itself.
    prompt = case.split("-", 1)[1] in PROMPT_METHODS
    assert ours.get_base_model() is (ours.base_model if prompt else ours.base_model.model)
    assert type(ours.get_base_model()) is type(theirs.get_base_model())


def skip_where_peft_cannot_prefix_tune(theirs, inputs) -> None:
    """peft 0.21.2 predates transformers 5.24's cache rename: there it refuses to prefix-tune a
    sequence classifier whose backbone has no ``past_key_values``, so it cannot be the oracle."""
    try:
        outputs(theirs, inputs)
    except ValueError as error:
        if "does not support past key values" not in str(error):
            raise
        pytest.skip(f"peft {peft.__version__} refuses this prefix-tuning case here: {error}")


@pytest.mark.parametrize("case", CASES)
def test_state_dict_moves_both_ways(case):
    ours, theirs, inputs = build(case)
    skip_where_peft_cannot_prefix_tune(theirs, inputs)
    randomize_trainable(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    expected = outputs(theirs, inputs)
    torch.testing.assert_close(outputs(ours, inputs), expected, atol=1e-5, rtol=1e-5)

    randomize_trainable(ours, seed=2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    expected = outputs(ours, inputs)
    torch.testing.assert_close(outputs(theirs, inputs), expected, atol=1e-5, rtol=1e-5)


def test_load_state_dict_assign_keeps_adapters_live():
    """``assign=True`` replaces Parameter objects: the adapter must read the new ones."""
    ours, theirs, inputs = build("llama-lora")
    randomize_trainable(theirs, seed=3)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=1e-5, rtol=1e-5)

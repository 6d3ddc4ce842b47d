"""Classification as generation: prompt formatting, answer-only labels, exact-match eval, training."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama, tiny_word_tokenizer as word_tokenizer
from _labutil import sentiment_word_rows
from peftlab import LoraConfig, TaskType
from peftlab.errors import PeftConfigError
from peftlab.lab.causal import (
    IGNORE_INDEX,
    PromptTemplate,
    build_causal_dataset,
    encode_example,
    exact_match_accuracy,
    generate,
    pad_batch,
    perplexity,
    read_jsonl,
)
from peftlab.lab.causal_train import train_causal



def test_labels_cover_only_the_answer():
    tok = word_tokenizer()
    ex = encode_example(tok, PromptTemplate(), "a good movie", 1, max_length=32)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == [3, 4, 14, 8, 12, 5, 4, 6, 1]  # Review : a good movie Sentiment : positive <eos>
    assert labels == [IGNORE_INDEX] * 7 + [6, 1]
    assert ex["attention_mask"] == [1] * 9
    neg = encode_example(tok, PromptTemplate(), "bad", 0, max_length=32)
    assert neg["labels"][-2:] == [7, 1] and set(neg["labels"][:-2]) == {IGNORE_INDEX}


def test_long_text_is_cut_but_template_and_answer_kept():
    tok = word_tokenizer()
    ex = encode_example(tok, PromptTemplate(), " ".join(["movie"] * 50) + " good", 1, max_length=12)
    assert len(ex["input_ids"]) <= 12
    assert ex["input_ids"][-4:] == [5, 4, 6, 1]  # "Sentiment : positive <eos>" survives the cut
    assert ex["input_ids"][:2] == [3, 4]
    with pytest.raises(PeftConfigError, match="max_length"):
        encode_example(tok, PromptTemplate(), "good", 1, max_length=2)


def test_prompt_template_validation():
    assert PromptTemplate().format("x") == "Review: x\nSentiment:"
    assert PromptTemplate().answer(0) == " negative"
    with pytest.raises(PeftConfigError, match="text"):
        PromptTemplate(prompt="no placeholder")
    with pytest.raises(PeftConfigError, match="distinct"):
        PromptTemplate(labels=("yes", "yes"))
    with pytest.raises(PeftConfigError, match="out of range"):
        PromptTemplate().answer(2)


def test_pad_batch_sides():
    feats = [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]},
             {"input_ids": [7], "attention_mask": [1], "labels": [7]}]
    right = pad_batch(feats, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert right["labels"].tolist() == [[-100, 6], [7, -100]]
    assert right["attention_mask"].tolist() == [[1, 1], [1, 0]]
    left = pad_batch(feats, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6], [0, 7]]


def test_read_jsonl_sample(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(f'{{"text": "t{i}", "label": {i % 2}}}' for i in range(10)) + "\n")
    assert [r["text"] for r in read_jsonl(path, limit=3)] == ["t0", "t1", "t2"]
    sample = read_jsonl(path, limit=4, seed=1)
    assert len(sample) == 4 and sample == read_jsonl(path, limit=4, seed=1) and sample != read_jsonl(path, limit=4)


def _greedy_one(model, tok, text: str) -> str:
    ids = torch.tensor([tok(PromptTemplate().format(text))["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_exact_match_with_left_padding_equals_one_by_one():
    torch.manual_seed(3)
    model, tok = tiny_llama().eval(), word_tokenizer()
    rows = sentiment_word_rows(6) + [{"text": "a good movie movie film the", "label": 1}]
    result = exact_match_accuracy(model, tok, rows, batch_size=4)
    expected = [_greedy_one(model, tok, r["text"]) for r in rows]
    assert result["predictions"] == expected
    gold = ["positive" if r["label"] else "negative" for r in rows]
    assert result["accuracy"] == sum(p == g for p, g in zip(expected, gold)) / len(rows)


@pytest.mark.parametrize("quantized", [False, True])
def test_train_causal_learns_the_labels(tmp_path, quantized):
    from peftlab.quantization import QuantConfig, is_quantized_linear

    torch.manual_seed(0)
    model, tok = tiny_llama(), word_tokenizer()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    train, held_out = sentiment_word_rows(64, seed=0), sentiment_word_rows(16, seed=1)
    before_ppl = perplexity(model, build_causal_dataset(held_out, tok), tok.pad_token_id)
    assert exact_match_accuracy(model, tok, held_out)["accuracy"] < 0.9
    # The tiny random head is trained too: behind a frozen RMSNorm its logits are too small to
    # give confident answers, which real pretrained heads do not suffer from.
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"])
    result = train_causal(
        model, train, held_out, tokenizer=tok, lora_config=config, learning_rate=1e-2, epochs=6, batch_size=8,
        output_dir=tmp_path / "adapter", quant=QuantConfig() if quantized else None,
    )
    assert result.steps == 48 and result.step_seconds > 0
    tokens = 6 * sum(len(r["input_ids"]) for r in build_causal_dataset(train, tok))  # no padding counted
    assert result.tokens_per_second == pytest.approx(tokens / result.train_seconds)
    assert result.eval["accuracy"] == 1.0
    assert result.eval["perplexity"] < min(before_ppl, 1.5)
    layer = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert is_quantized_linear(layer) == quantized
    if not quantized:  # generate() reloads base + adapter from disk
        assert generate(tmp_path / "adapter", "Review: the great film\nSentiment:", max_new_tokens=2, base_model=str(base_dir)) == "positive"
        assert generate(tmp_path / "adapter", "Review: awful movie\nSentiment:", max_new_tokens=2, base_model=str(base_dir)) == "negative"


def test_train_causal_without_eval_rows_trains_and_measures_nothing_else(tmp_path, monkeypatch):
    """No eval rows: the one training path skips evaluation instead of evaluating an empty set."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model, tok = tiny_llama(), word_tokenizer()
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4, target_modules=["q_proj"])
    result = train_causal(model, sentiment_word_rows(8, seed=0), tokenizer=tok, lora_config=config, max_steps=3, batch_size=4)
    assert result.steps == 3 and result.eval == {} and result.output_dir is None
    assert result.train_loss > 0 and result.tokens_per_second > 0
    assert not list(tmp_path.iterdir())  # checkpoints and records went to a scratch folder, not the working folder

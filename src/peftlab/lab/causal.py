"""Classification as text generation with a causal LM: prompts, masked labels, evaluation.

A labelled row ``{"text": ..., "label": 1}`` becomes ``"Review: <text>\\nSentiment:"`` followed
by the answer ``" positive"`` and the end-of-sequence token. The loss covers only the answer
tokens (labels are -100 elsewhere), so the model learns to answer, not to rewrite reviews.
Evaluation generates greedily and counts exact matches of the label word, and reports the
perplexity of the answer tokens.

The workbench's one training path (``peftlab train --task causal-lm``, and the function API
:func:`peftlab.lab.causal_train.train_causal`) plugs in the template, dataset, collator and metric
functions of this module; :func:`generate` continues a prompt with a saved adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftConfigError

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


@dataclass(frozen=True)
class PromptTemplate:
    """How a row becomes a prompt and an answer.

    Args:
        prompt: format string with ``{text}``; it should end where the answer starts.
        labels: the answer word for each integer label.
    """

    prompt: str = "Review: {text}\nSentiment:"
    labels: tuple[str, ...] = ("negative", "positive")

    def __post_init__(self) -> None:
        if "{text}" not in self.prompt:
            raise PeftConfigError(f"PromptTemplate: prompt must contain '{{text}}', got {self.prompt!r}.")
        if len(set(self.labels)) != len(self.labels) or not all(w.strip() == w and w for w in self.labels):
            raise PeftConfigError(f"PromptTemplate: labels must be distinct non-empty words without outer spaces, got {self.labels!r}.")

    def format(self, text: str) -> str:
        return self.prompt.format(text=text)

    def answer(self, label: int) -> str:
        if not 0 <= label < len(self.labels):
            raise PeftConfigError(f"label {label} is out of range for labels {self.labels}.")
        return " " + self.labels[label]  # the space belongs to the answer token, as in running text


TEMPLATES: dict[str, PromptTemplate] = {
    "sst2": PromptTemplate(),
    "imdb": PromptTemplate(),
    "yelp_polarity": PromptTemplate(),
    "ag_news": PromptTemplate("Article: {text}\nTopic:", ("world", "sports", "business", "science")),
}


def read_jsonl(path: str | os.PathLike, limit: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """Rows of a ``{"text", "label"}`` JSONL file; with ``seed`` a seeded sample of ``limit`` rows."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


# ----- tokenization -------------------------------------------------------------------------
def _prompt_ids(tokenizer: Any, template: PromptTemplate, text: str, budget: int) -> list[int]:
    """Prompt token ids, shortening the text (never the template) to fit ``budget`` tokens."""
    ids = tokenizer(template.format(text), add_special_tokens=True)["input_ids"]
    if len(ids) <= budget:
        return ids
    overflow = len(ids) - budget
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(len(text_ids) - overflow - 2, 0)  # -2: re-tokenizing at the cut can add a token
    short = tokenizer.decode(text_ids[:keep])
    return tokenizer(template.format(short), add_special_tokens=True)["input_ids"][-budget:]


def encode_example(tokenizer: Any, template: PromptTemplate, text: str, label: int, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + answer + eos; labels = -100 over the prompt, the ids over the answer."""
    answer = tokenizer(template.answer(label), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    if len(answer) >= max_length:
        raise PeftConfigError(f"max_length={max_length} leaves no room for the prompt (the answer alone is {len(answer)} tokens).")
    prompt = _prompt_ids(tokenizer, template, text, max_length - len(answer))
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def build_causal_dataset(
    rows: Iterable[dict[str, Any]], tokenizer: Any, template: PromptTemplate = PromptTemplate(), max_length: int = 128
) -> list[dict[str, list[int]]]:
    """Tokenized training examples with the loss masked to the answer tokens."""
    return [encode_example(tokenizer, template, row["text"], int(row["label"]), max_length) for row in rows]


def pad_batch(features: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: input ids with ``pad_id``, labels with -100, mask with 0."""
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {k: [] for k in features[0]}
    for f in features:
        gap = width - len(f["input_ids"])
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        for key, values in f.items():
            pad = [fill[key]] * gap
            out[key].append(values + pad if side == "right" else pad + values)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def collator(tokenizer: Any) -> Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda features: pad_batch(features, pad_id, "right")


# ----- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, dataset: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood of the answer tokens)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    nll, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(dataset[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = target != IGNORE_INDEX
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float(picked[mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def template_for(label_names: Sequence[str] | None, num_labels: int, prompt: str | None = None) -> PromptTemplate:
    """The template of a workbench run: its label words (default negative/positive for two labels)."""
    if label_names is None:
        if num_labels != 2:
            raise PeftConfigError(f"the data has {num_labels} labels; give their answer words with label_names "
                                  f"(e.g. label_names: [world, sports, business, science]).")
        label_names = PromptTemplate.labels
    if len(label_names) < num_labels:
        raise PeftConfigError(f"label_names {list(label_names)} names {len(label_names)} labels but the data has {num_labels}; "
                              f"give one word per label.")
    return PromptTemplate(prompt or PromptTemplate.prompt, tuple(label_names))


def _answer_of(generated: str) -> str:
    return generated.strip()


@torch.no_grad()
def exact_match_accuracy(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    template: PromptTemplate = PromptTemplate(),
    batch_size: int = 16,
    max_length: int = 128,
) -> dict[str, Any]:
    """Greedy-generate an answer for each row; accuracy = share of answers equal to the label word."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answer_len = max(len(tokenizer(template.answer(i), add_special_tokens=False)["input_ids"]) for i in range(len(template.labels)))
    predictions: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                   for ids in (_prompt_ids(tokenizer, template, r["text"], max_length - answer_len - 1) for r in chunk)]
        batch = {k: v.to(_device_of(model)) for k, v in pad_batch(prompts, pad_id, side="left").items()}  # left padding: generation continues every row at the end
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=answer_len + 1,
            do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row_ids in out[:, batch["input_ids"].shape[1] :]:
            predictions.append(_answer_of(tokenizer.decode(row_ids, skip_special_tokens=True)))
    model.train(was_training)
    gold = [template.labels[int(r["label"])] for r in rows]
    correct = sum(p == g for p, g in zip(predictions, gold))
    return {"accuracy": correct / max(len(rows), 1), "predictions": predictions, "n": len(rows)}


# ----- loading / generating -------------------------------------------------------------------
def load_causal_lm(name_or_path: str, quant: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for an alias, folder or hub id; ``quant`` a QuantConfig for a k-bit base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.lab.model_zoo import resolve_model_name

    path = resolve_model_name(name_or_path)
    # trust_remote_code=False: a base that needs its own code is refused with an error, never asked about on stdin
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if quant is not None:
        from peftlab.quantization import load_quantized_model

        model = load_quantized_model(path, quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generate(
    model_dir_or_adapter: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 32,
    base_model: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> str:
    """Continue ``prompt`` with a saved model or adapter folder and return only the new text.

    An adapter folder (``adapter_config.json``) is loaded on top of ``base_model`` or, if not
    given, the base named in its config.
    """
    from peftlab import PeftConfig, PeftModel

    folder = Path(model_dir_or_adapter)
    if (folder / "adapter_config.json").is_file():
        config = PeftConfig.from_pretrained(folder)
        base = base_model or config.base_model_name_or_path
        if not base:
            raise PeftConfigError(f"{folder}/adapter_config.json names no base model; pass base_model=.")
        model, tokenizer = load_causal_lm(base)
        if (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        model = PeftModel.from_pretrained(model, folder)
    else:
        model, tokenizer = load_causal_lm(os.fspath(model_dir_or_adapter))
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").to(_device_of(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

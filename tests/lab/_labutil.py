"""Helpers and fixtures for workbench tests (imported by name: a conftest.py here would shadow tests/conftest.py): a tiny BERT with its own word-level tokenizer, saved to disk,
and a learnable toy sentiment data set (label 1 when the text says "good")."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["good", "bad", "movie", "film", "plot", "actor", "scene", "story", "music", "very", "quite", "the", "a", "was", "is"]


def toy_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words; half contain "good" (label 1), the rest "bad" (label 0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(WORDS[2:]) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT for sequence classification, without dropout, and its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy-data")
    write_jsonl(folder / "train.jsonl", toy_rows(64, 0))
    write_jsonl(folder / "validation.jsonl", toy_rows(24, 1))
    return folder


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m peftlab ARGS`` with this checkout's sources, offline, one thread."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "peftlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sentiment_word_rows(n: int, seed: int = 0) -> list[dict]:
    """Four-word texts whose one sentiment word decides the label (small enough for a tiny causal LM)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg, filler = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "a", "movie", "film"]
    rows = []
    for i in range(n):
        label = i % 2
        words = [filler[int(torch.randint(4, (1,), generator=g))] for _ in range(3)]
        words.insert(int(torch.randint(4, (1,), generator=g)), (pos if label else neg)[int(torch.randint(3, (1,), generator=g))])
        rows.append({"text": " ".join(words), "label": label})
    return rows

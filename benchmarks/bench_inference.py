"""Inference throughput with one LoRA adapter, merged and unmerged, against the bare base model.

all-MiniLM-L6-v2 classifier, LoRA r=8 on all linear layers (random A and B so the adapter
is not a no-op), batch 32, eval mode, no_grad, 2 threads. Both libraries load the same adapter
weights (peft saves, peftlab loads), so outputs are compared as well as timed.

    PYTHONPATH=src python benchmarks/bench_inference.py --seq 64 --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import peft
    import peftlab

    base = C.minilm_classifier().eval()
    inputs = C.batch(args.batch, args.seq)
    inputs.pop("labels")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter()
    ours_merged = copy.deepcopy(ours)
    ours_merged.merge_adapter()

    models = {
        "base": base,
        "peftlab_unmerged": ours,
        "peft_unmerged": theirs,
        "peftlab_merged": ours_merged,
        "peft_merged": theirs_merged,
    }
    with torch.no_grad():
        reference = theirs(**inputs).logits
        diffs = {name: (m(**inputs).logits - reference).abs().max().item() for name, m in models.items() if name != "base"}
        fns = {name: (lambda m=m: m(**inputs)) for name, m in models.items()}
        times = C.alternate(fns, rounds=args.rounds, warmup=2)

    rows, table = [], {}
    tokens = args.batch * args.seq
    for name in models:
        entry = {
            "median_s": C.median(times[name]),
            "tokens_per_s": tokens / C.median(times[name]),
            "time_vs_base": C.paired_ratio(times, name, "base"),
            "max_abs_diff_vs_peft_unmerged": diffs.get(name),
            "times_s": times[name],
        }
        peer = name.replace("peftlab", "peft")
        if name.startswith("peftlab"):
            entry["time_vs_peft"] = C.paired_ratio(times, name, peer)
        table[name] = entry
        rows.append([name, f"{entry['median_s'] * 1000:.0f}", f"{entry['tokens_per_s']:.0f}", f"{entry['time_vs_base']:.3f}",
                     f"{entry['time_vs_peft']:.3f}" if "time_vs_peft" in entry else "",
                     f"{diffs[name]:.1e}" if name in diffs else ""])
    C.print_table(["variant", "ms", "tokens/s", "time x base", "time x peft", "max|diff|"], rows)
    C.write_results(f"inference_seq{args.seq}", {"seq": args.seq, "batch": args.batch, "rounds": args.rounds, "results": table})


if __name__ == "__main__":
    main()

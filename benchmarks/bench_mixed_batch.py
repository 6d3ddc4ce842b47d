"""Mixed-batch inference: 4 LoRA adapters, each row of a batch of 32 routed to its own adapter.

peft's ``adapter_names=`` against peftlab's, on the same adapter weights (saved by peft, loaded
by peftlab; LoRA r=8 on all 36 encoder linear layers, random A and B), eval mode, no_grad, 2 threads.
Two row orders: interleaved (row i uses adapter i mod 4, the worst case) and grouped (rows sorted
by adapter, as a server can arrange them). Also times the bare base model and the four sub-batches
run one after another with ``set_adapter`` (what you would do without mixed batches).

    PYTHONPATH=src python benchmarks/bench_mixed_batch.py --seq 64 --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import _common as C
import torch

ADAPTERS = ["a0", "a1", "a2", "a3"]
# The 36 encoder linear layers, spelled out: peft resolves "all-linear" differently for an
# adapter added next to an existing one (it then also matches the head's wrapper).
LINEAR = ["query", "key", "value", "output.dense", "intermediate.dense"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()

    import peft
    import peftlab

    base = C.minilm_classifier().eval()
    inputs = C.batch(args.batch, args.seq)
    inputs.pop("labels")
    rows = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.batch)]
    grouped = sorted(rows)

    torch.manual_seed(1)
    theirs = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ADAPTERS:
            config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=LINEAR, init_lora_weights=False)
            if theirs is None:
                theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
            else:
                theirs.add_adapter(name, config)
        theirs.save_pretrained(tmp)
        ours = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{ADAPTERS[0]}", adapter_name=ADAPTERS[0])
        for name in ADAPTERS:
            if name != ADAPTERS[0]:
                ours.load_adapter(f"{tmp}/{name}", adapter_name=name)
    theirs.eval()
    ours.eval()

    def sequential(model) -> None:
        for name in ADAPTERS:
            idx = [i for i, r in enumerate(rows) if r == name]
            model.set_adapter(name)
            model(**{k: v[idx] for k, v in inputs.items()})

    with torch.no_grad():
        diff = max((ours(**inputs, adapter_names=names).logits - theirs(**inputs, adapter_names=names).logits).abs().max().item()
                   for names in (rows, grouped))
        fns = {
            "base": lambda: base(**inputs),
            "peftlab_mixed": lambda: ours(**inputs, adapter_names=rows),
            "peft_mixed": lambda: theirs(**inputs, adapter_names=rows),
            "peftlab_mixed_grouped": lambda: ours(**inputs, adapter_names=grouped),
            "peft_mixed_grouped": lambda: theirs(**inputs, adapter_names=grouped),
            "peftlab_sequential": lambda: sequential(ours),
            "peft_sequential": lambda: sequential(theirs),
        }
        times = C.alternate(fns, rounds=args.rounds, warmup=2)

    table, out_rows = {}, []
    for name in fns:
        med = C.median(times[name])
        entry = {"median_s": med, "rows_per_s": args.batch / med, "time_vs_base": C.paired_ratio(times, name, "base"), "times_s": times[name]}
        if name.startswith("peftlab"):
            entry["throughput_vs_peft"] = C.paired_ratio(times, name.replace("peftlab", "peft"), name)
        table[name] = entry
        out_rows.append([name, f"{med * 1000:.0f}", f"{entry['rows_per_s']:.1f}", f"{entry['time_vs_base']:.2f}",
                         f"{entry['throughput_vs_peft']:.2f}" if "throughput_vs_peft" in entry else ""])
    C.print_table(["variant", "ms", "rows/s", "time x base", "throughput x peft"], out_rows)
    print(f"max |peftlab - peft| logits: {diff:.2e}")
    C.write_results(f"mixed_batch_seq{args.seq}" + (f"_{args.tag}" if args.tag else ""), {"row_orders": {"interleaved": rows, "grouped": grouped},"seq": args.seq, "batch": args.batch, "adapters": ADAPTERS,
                                                    "rounds": args.rounds, "max_abs_diff": diff, "results": table})


if __name__ == "__main__":
    main()

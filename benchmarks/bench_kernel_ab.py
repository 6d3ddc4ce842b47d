"""A/B of two versions of the fused LoRA kernel on whole MiniLM training steps, in one process.

Kernel changes move a training step by a few percent, less than run-to-run noise on a shared
machine; only an interleaved comparison in one process settles them. This script loads another
version of ``src/peftlab/kernels.py`` (e.g. the last commit's) beside the current one, and times
training steps of one LoRA model switching between the two kernels' ``_fused`` (which ties
that version's mask and autograd node together), alternating with full fine-tuning steps; it prints medians, x full FT,
and the median paired ratio current/other.

    git show HEAD~1:src/peftlab/kernels.py > /tmp/kernels_before.py
    cd benchmarks && PYTHONPATH=../src python bench_kernel_ab.py /tmp/kernels_before.py --dropout 0.1
    cd benchmarks && PYTHONPATH=../src python bench_kernel_ab.py /tmp/kernels_before.py --model smollm2 --seq 256 --batch 4 --dropout 0.05

``--model smollm2`` runs bench_causal.py's setting instead (SmolLM2-135M, LoRA r=16, alpha 32 on all
linear layers, labels = ids).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys

import _common as C
import torch

from peftlab import kernels

ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="path to the other version of kernels.py")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("other_kernels", args.other)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up while the file runs
    spec.loader.exec_module(other)

    if args.model == "smollm2":
        import peftlab
        from bench_causal import LORA, causal_inputs, load_base

        base = load_base()
        inputs = causal_inputs(base, args.batch, args.seq)
        config = peftlab.LoraConfig(task_type="CAUSAL_LM", **{**LORA, "lora_dropout": args.dropout})
    else:
        base = C.minilm_classifier()
        inputs = C.batch(args.batch, args.seq)
        config = C.peft_lora_config("peftlab", r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=ALL_LINEAR)
    lora_step = C.train_step_fn(C.get_peft_model("peftlab", copy.deepcopy(base), config), inputs)
    full_step = C.train_step_fn(copy.deepcopy(base), inputs)
    current = kernels._fused

    def with_kernel(fused):
        def step() -> None:
            kernels._fused = fused  # looked up per call by kernels.lora_linear
            lora_step()
        return step

    fns = {"current": with_kernel(current), "other": with_kernel(other._fused), "full_ft": full_step}
    try:
        times = C.alternate(fns, rounds=args.rounds, warmup=2)
    finally:
        kernels._fused = current
    rows, table = [], {}
    for name in fns:
        table[name] = {"median_ms": C.median(times[name]) * 1e3, "x_full_ft": C.paired_ratio(times, name, "full_ft")}
        rows.append([name, f"{table[name]['median_ms']:.1f}", f"{table[name]['x_full_ft']:.3f}"])
    ratio = C.paired_ratio(times, "current", "other")
    C.print_table(["kernel", "median ms", "x full FT"], rows)
    print(f"current / other (median of paired ratios): {ratio:.3f}")
    name = ("kernel_ab_smollm2" if args.model == "smollm2" else "kernel_ab") + f"_seq{args.seq}_d{args.dropout:g}" + (f"_{args.tag}" if args.tag else "")
    C.write_results(name, {"args": vars(args), "results": table, "current_vs_other": ratio})


if __name__ == "__main__":
    main()

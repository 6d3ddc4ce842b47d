"""Training step time and peak step memory: peftlab vs Hugging Face peft vs full fine-tuning.

all-MiniLM-L6-v2 with a 2-way head, batch 16, fp32, 2 threads, model dropout on (train mode).
Every variant gets its own copy of the same weights; one round times one optimizer step of
each variant in turn (order reversed every other round), after warm-up. Reported: median step
time, the median of per-round ratios to the full fine-tuning step and to peft's step for the
same configuration, and the memory a step holds at its peak (tensors saved for backward,
plus gradients; see ``_common.step_memory``).

    PYTHONPATH=src python benchmarks/bench_train.py --seq 64 --rounds 15
    PYTHONPATH=src python benchmarks/bench_train.py --seq 64 --rounds 8 --autocast bf16
"""

from __future__ import annotations

import argparse
import copy

import _common as C
import torch

CONFIGS: dict[str, dict] = {
    "lora_qv_d0": dict(kind="lora", r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0),
    "lora_qv_d0.1": dict(kind="lora", r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1),
    "lora_all_d0": dict(kind="lora", r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    "lora_all_d0.1": dict(kind="lora", r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1),
    "ia3": dict(kind="IA3Config"),
    # issue 26's methods and LoRA options (PiSSA trains exactly as LoRA: the init only sets the factors)
    "lora_bias_qv": dict(kind="lora", r=8, lora_alpha=16, target_modules=["query", "value"], lora_bias=True),
    "trainable_tokens": dict(kind="TrainableTokensConfig", token_indices=list(range(100, 132))),
    "vera_qv": dict(kind="VeraConfig", r=256, target_modules=["query", "value"]),
    "oft_qv": dict(kind="OFTConfig", oft_block_size=32, target_modules=["query", "value"]),
}


def build(lib: str, base: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """The variant's PeftModel in ``lib``: a LoraConfig, or the config class ``kind`` names (same arguments in both)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "lora":
        config = C.peft_lora_config(lib, **spec)
    else:
        import importlib

        config = getattr(importlib.import_module(lib), kind)(task_type="SEQ_CLS", **spec)
    return C.get_peft_model(lib, copy.deepcopy(base), config)


def under_bf16_autocast(step):
    def wrapped() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--libs", nargs="*", default=["peftlab", "peft"])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--tag", default="", help="suffix for the results file (a partial re-run keeps the full table)")
    parser.add_argument("--autocast", choices=["bf16"], help="run every variant under CPU bf16 autocast (full_ft_fp32 added for reference)")
    args = parser.parse_args()

    base = C.minilm_classifier()
    inputs = C.batch(args.batch, args.seq)
    full = copy.deepcopy(base)
    steps: dict[str, object] = {"full_ft": C.train_step_fn(full, inputs)}
    frozen = copy.deepcopy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.classifier.weight.requires_grad_(True)  # only the head trains, but gradients flow through the body:
    frozen.bert.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())
    models = {"full_ft": full, "frozen_floor": frozen}
    steps["frozen_floor"] = C.train_step_fn(frozen, inputs)
    for name in args.configs:
        for lib in args.libs:
            model = build(lib, base, CONFIGS[name])
            models[f"{name}/{lib}"] = model
            steps[f"{name}/{lib}"] = C.train_step_fn(model, inputs)

    if args.autocast:
        steps = {name: under_bf16_autocast(step) for name, step in steps.items()}
        models["full_ft_fp32"] = copy.deepcopy(base)
        steps["full_ft_fp32"] = C.train_step_fn(models["full_ft_fp32"], inputs)

    times = C.alternate(steps, rounds=args.rounds, warmup=2)
    memory = {}
    if not args.no_memory:
        for name in steps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.autocast) and name != "full_ft_fp32"):
                memory[name] = C.step_memory(models[name], inputs)

    rows, table = [], {}
    for name in steps:
        entry = {
            "median_s": C.median(times[name]),
            "vs_full_ft": C.paired_ratio(times, name, "full_ft"),
            "memory_mb": memory.get(name),
            "times_s": times[name],
        }
        if name.endswith("/peftlab") and name.replace("/peftlab", "/peft") in steps:
            entry["vs_peft"] = C.paired_ratio(times, name, name.replace("/peftlab", "/peft"))
        table[name] = entry
        rows.append([
            name,
            f"{entry['median_s'] * 1000:.0f}",
            f"{entry['vs_full_ft']:.2f}",
            f"{entry['vs_peft']:.2f}" if "vs_peft" in entry else "",
            f"{memory[name]['saved_mb']:.0f}" if memory else "",
            f"{memory[name]['total_mb']:.0f}" if memory else "",
        ])
    C.print_table(["variant", "ms", "x full FT", "x peft", "saved MB", "saved+grads MB"], rows)
    name = f"train_seq{args.seq}" + ("_bf16" if args.autocast else "") + (f"_{args.tag}" if args.tag else "")
    C.write_results(name, {"seq": args.seq, "batch": args.batch, "rounds": args.rounds, "autocast": args.autocast, "results": table})


if __name__ == "__main__":
    main()

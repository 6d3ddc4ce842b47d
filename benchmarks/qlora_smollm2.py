"""LoRA on SmolLM2-135M-Instruct with an fp32 base vs a 4-bit NF4 base (QLoRA), on SST-2.

Each setting runs in its own process so peak memory is that setting's alone. Measured per
setting: bytes of the base linear weights, peak resident memory while training (sampled),
median seconds per optimizer step, exact-match accuracy of the generated label word and
answer perplexity on SST-2 validation sentences, before and after training.

    python benchmarks/qlora_smollm2.py --train-size 500 --eval-size 300

Results go to benchmarks/results/qlora_smollm2_<train-size>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("fp32", "nf4")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples resident memory every few ms in a thread; CPU torch has no allocator statistics."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def release_memory() -> None:
    """Give freed heap pages back to the OS so RSS reflects live tensors (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def say(setting: str, message: str) -> None:
    """A progress line on stderr (stdout carries the child's JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {setting}: {message}", file=sys.stderr, flush=True)


def progress_callback(setting: str, every: int = 10):  # noqa: ANN201 - a transformers.TrainerCallback
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                say(setting, f"step {state.global_step}/{state.max_steps}")

    return StepProgress()


def run_one(setting: str, args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from peftlab import LoraConfig, TaskType
    from peftlab.lab import causal
    from peftlab.lab.causal_train import train_causal
    from peftlab.quantization import QuantConfig, parameter_bytes, weight_bytes

    torch.set_num_threads(args.threads)
    data = (ROOT / args.data).resolve()
    train = causal.read_jsonl(data / "sst2" / "train.jsonl", limit=args.train_size, seed=args.seed)
    held_out = causal.read_jsonl(data / "sst2" / "validation.jsonl", limit=args.eval_size, seed=args.seed)
    quant = QuantConfig(bits=4, quant_type="nf4", double_quant=args.double_quant) if setting == "nf4" else None
    say(setting, "loading SmolLM2-135M" + (" and quantizing it to NF4" if quant else ""))
    model, tokenizer = causal.load_causal_lm("smollm2-135m", quant)
    release_memory()
    template = causal.TEMPLATES["sst2"]
    eval_set = causal.build_causal_dataset(held_out, tokenizer, template, args.max_length)
    say(setting, f"zero-shot evaluation on {len(held_out)} sentences")
    zero_shot = causal.exact_match_accuracy(model, tokenizer, held_out, template, args.eval_batch_size, args.max_length)
    before = {
        "accuracy": zero_shot["accuracy"],
        "perplexity": causal.perplexity(model, eval_set, tokenizer.pad_token_id, args.eval_batch_size),
        "first_predictions": zero_shot["predictions"][:8],
    }
    memory = {"base_linear_weight_bytes": weight_bytes(model), "base_parameter_bytes": parameter_bytes(model)}
    release_memory()
    memory["rss_before_training_bytes"] = rss_bytes()
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","))
    say(setting, f"training on {len(train)} sentences, then evaluating")
    with PeakSampler() as peak:
        result = train_causal(
            model, train, held_out, tokenizer=tokenizer, template=template, lora_config=lora, quant=None,
            gradient_checkpointing=args.gradient_checkpointing, epochs=args.epochs, learning_rate=args.lr,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, eval_batch_size=args.eval_batch_size,
            callbacks=[progress_callback(setting)],
        )
    memory["peak_rss_training_bytes"] = peak.peak
    after = causal.exact_match_accuracy(result.model, tokenizer, held_out[:8], template, args.eval_batch_size, args.max_length)
    result.eval["first_predictions"] = after["predictions"]
    trainable, total = result.model.get_nb_trainable_parameters()
    return {
        "setting": setting,
        "quant": None if quant is None else {"bits": 4, "quant_type": "nf4", "double_quant": args.double_quant},
        "memory": memory,
        "train": {"loss": result.train_loss, "seconds": result.train_seconds, "median_step_seconds": result.step_seconds,
                  "steps": result.steps, "trainable_params": trainable, "all_params": total},
        "eval_before": before,
        "eval_after": result.eval,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--data", default="../shared/data", help="data folder, relative to the repository root")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--parallel", action="store_true", help="run the settings at the same time")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.one:  # child process: one setting, JSON on the last stdout line
        print(json.dumps(run_one(args.one, args)))
        return
    runs = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    # --parallel runs the settings side by side (each in its own process, so memory stays
    # separate); step times are then measured under the same machine load for both.
    procs = {}
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", setting]
        # stderr passes through: the children's progress lines (and any traceback) show as they happen.
        procs[setting] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if not args.parallel:
            procs[setting].wait()
    for setting, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            runs[setting] = {"status": "failed", "returncode": proc.returncode}
            print(f"{setting}: FAILED with exit code {proc.returncode} (its traceback is above)", file=sys.stderr)
            continue
        runs[setting] = {"status": "ok", **json.loads(stdout.strip().splitlines()[-1])}
        print(json.dumps(runs[setting], indent=1))
    summary = {}
    if all(runs.get(s, {}).get("status") == "ok" for s in ("fp32", "nf4")):
        a, b = runs["fp32"], runs["nf4"]
        summary = {
            "base_linear_weights_ratio_fp32_over_nf4": a["memory"]["base_linear_weight_bytes"] / b["memory"]["base_linear_weight_bytes"],
            "base_parameter_bytes_ratio": a["memory"]["base_parameter_bytes"] / b["memory"]["base_parameter_bytes"],
            "peak_rss_training_ratio": a["memory"]["peak_rss_training_bytes"] / b["memory"]["peak_rss_training_bytes"],
            "step_time_ratio_nf4_over_fp32": b["train"]["median_step_seconds"] / a["train"]["median_step_seconds"],
        }
    import bitsandbytes
    import torch
    import transformers

    out = {
        "benchmark": "qlora_smollm2",
        "command": "python benchmarks/qlora_smollm2.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "bitsandbytes": bitsandbytes.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "wall_seconds": time.perf_counter() - start,
        "runs": runs,
        "summary": summary,
    }
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"qlora_smollm2_{args.train_size}.json"
    sys.path.insert(0, str(ROOT / "src"))
    from peftlab.io import atomic_write_text

    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

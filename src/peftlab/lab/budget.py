"""``compare --dry-run``: list a study's runs and estimate its time from a short timed probe.

The probe builds each distinct model + method once (as the run would), times a few real
optimizer steps on the run's own batches and one evaluation batch, and scales by the run's step
and evaluation counts. It writes nothing. Estimates ignore the probe's warm-up and any later
speed change (thermal limits, other processes), so read them as the right order of magnitude.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.lab import cache, measure
from peftlab.lab.experiment import RunConfig

PROBE_STEPS = 3


@dataclass
class Probe:
    setup_seconds: float  # model + data loading, paid by every run
    step_seconds: float  # one optimizer step of one batch
    eval_row_seconds: float  # one evaluation row
    n_train: int
    n_eval: int  # per-epoch evaluation rows (dev in held-out mode)
    n_test: int  # rows scored once at the end (0 without a held-out test split)


def _probe_key(run: RunConfig) -> str:
    """Runs that cost the same per step share a probe (seed and learning rates do not matter)."""
    spec = run.to_dict()
    for key in ("name", "group", "setting"):
        spec.pop(key, None)
    for key in ("seed", "learning_rate", "head_learning_rate", "weight_decay", "warmup_ratio", "epochs", "max_steps", "progress"):
        spec["train"].pop(key, None)
    return json.dumps(spec, sort_keys=True, default=str)


def probe(run: RunConfig, steps: int = PROBE_STEPS) -> Probe:
    """Time ``steps`` optimizer steps (after one warm-up step) and one evaluation batch of ``run``."""
    from peftlab.lab.setup import Prepared

    watch = measure.Stopwatch()
    prep = Prepared(run)
    setup = watch.seconds()
    cfg = run.train
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model = prep.model.to(device)
    collate = prep.task.collator
    n = len(prep.train_set)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)

    def batch(dataset: Any, start: int, size: int, order: list[int] | None = None) -> dict[str, torch.Tensor]:
        rows = [dataset[(order or range(len(dataset)))[(start + i) % len(dataset)]] for i in range(size)]
        return {k: v.to(device) for k, v in collate(rows).items()}

    # Length-grouped runs pad each batch to rows of similar length: time batches of such rows, at
    # spread-out length quantiles, instead of rows in data order (padded to the longest of a mixed batch).
    order = _by_length(prep.train_set) if cfg.group_by_length else None

    def start_of(i: int) -> int:
        if order is None:
            return i * cfg.batch_size
        return int((i - 0.5) / steps * max(n - cfg.batch_size, 0)) if i else 0

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(**batch(prep.train_set, start_of(i), cfg.batch_size, order)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step(0)
    _sync(device)
    watch = measure.Stopwatch()
    for i in range(1, steps + 1):
        step(i)
    _sync(device)
    step_seconds = watch.seconds() / steps
    model.eval()
    size = min(cfg.eval_batch_size, len(prep.eval_set))
    with torch.no_grad():
        model(**batch(prep.eval_set, 0, size))  # warm-up
        _sync(device)
        watch = measure.Stopwatch()
        model(**batch(prep.eval_set, 0, size))
        _sync(device)
    test_set = getattr(prep, "test_set", None)
    return Probe(setup, step_seconds, watch.seconds() / size, n, len(prep.eval_set), len(test_set) if test_set is not None else 0)


def _by_length(dataset: Any) -> list[int] | None:
    """Row indices from shortest to longest input (None when rows have no ``input_ids``)."""
    try:
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    except (KeyError, TypeError):
        return None
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def estimate_seconds(run: RunConfig, p: Probe) -> float:
    """setup + steps x step time (accumulated micro-batches included) + evaluation rows x row time."""
    from peftlab.lab.setup import optimizer_steps

    steps = optimizer_steps(run.train, p.n_train) * run.train.gradient_accumulation_steps
    evaluations = math.ceil(run.train.epochs) if run.train.max_steps <= 0 else 1
    rows = evaluations * p.n_eval + p.n_test + (p.n_eval if p.n_test == 0 else 0)  # + the final pass for predictions
    return p.setup_seconds + steps * p.step_seconds + rows * p.eval_row_seconds


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class PlannedRun:
    name: str  # ".<best>" stands for a setting the sweep has not chosen yet
    method: str
    role: str
    seconds: float | None  # estimated time; None: reused from an identical finished run


def plan(experiment: Any, groups: list, *, use_cache: bool = True, probe_fn: Any = probe) -> list[PlannedRun]:
    """Every run of the study in training order, with its estimated time (one probe per model and method)."""
    from peftlab.lab.study import run_dir

    startup = process_age()  # imports + reading the data, which every run's own process pays again
    probes: dict[str, Probe] = {}
    planned_runs: list[PlannedRun] = []
    for group in groups:
        planned: list[tuple[RunConfig, str]] = [(r, "sweep") for r in group.sweep_runs()]
        if group.swept:
            # the first seed at the chosen setting is the sweep's own run; the other seeds follow it
            template = group.final_runs(group.settings[0])[1:]
            planned += [(r, "seed, at the setting chosen on dev") for r in template]
        else:
            planned += [(r, "seed" if group.seeded else "run") for r in group.final_runs(group.settings[0])]
        for run, role in planned:
            undecided = role.startswith("seed, at")  # its setting is not known before the sweep ran
            hit = use_cache and not undecided and cache.cached(run_dir(experiment, run), cache.run_key(run)) is not None
            seconds = None
            if not hit:
                key = _probe_key(run)
                if key not in probes:
                    probes[key] = probe_fn(run)
                seconds = startup + estimate_seconds(run, probes[key])
            name = run.name.replace(_setting_tag(group, run), ".<best>") if undecided else run.name
            planned_runs.append(PlannedRun(name, run.method, role, seconds))
    return planned_runs


def dry_run(experiment: Any, groups: list, *, use_cache: bool = True, probe_fn: Any = probe) -> str:
    """The plan as text: each run (reused ones marked), its estimated time, and the total."""
    planned = plan(experiment, groups, use_cache=use_cache, probe_fn=probe_fn)
    lines = [f"study {experiment.name}: results in {experiment.output_dir}"]
    for p in planned:
        lines.append(f"  {p.name:<40} {p.method:<14} {p.role:<36} " + ("reused" if p.seconds is None else f"~{_clock(p.seconds)}"))
    total = sum(p.seconds or 0.0 for p in planned)
    lines.append(f"{sum(p.seconds is not None for p in planned)} runs to train, estimated {_clock(total)} "
                 f"(from a {PROBE_STEPS}-step timed probe per model and method; reused runs cost nothing)")
    return "\n".join(lines)


def _setting_tag(group: Any, run: RunConfig) -> str:
    """The part of a run name that spells its setting (".lr0.001"), replaced by <best> before the choice."""
    return run.name[len(group.name):].rsplit(".s", 1)[0] if group.seeded else run.name[len(group.name):]

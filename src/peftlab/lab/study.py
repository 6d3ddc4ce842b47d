"""A study: check every run up front, train each in its own process, collect, report.

One process per run keeps each method's peak memory its own and keeps a crash in one run
from taking the others down: a run that fails is recorded as failed and the study goes on.
Finished runs are reused by their cache key (``peftlab.lab.cache``) and results.json is
rewritten after every run, so stopping a study loses at most the run in progress.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import peftlab
from peftlab.io import atomic_write_text
from peftlab.lab import cache, report
from peftlab.lab.console import duration
from peftlab.lab.data import load_splits
from peftlab.lab.experiment import Experiment, RunConfig
from peftlab.lab.methods import build_config
from peftlab.lab.results import FAILED, RunResult, load_run, save_run, save_study
from peftlab.lab.runner import RUN_SPEC_NAME


# python -m peftlab.lab.runner, except that a Ctrl-C while the worker still imports torch and transformers
# (seconds) ends it quietly too: the study's process reports the interruption in one line. During the
# imports Ctrl-C is only noted: a KeyboardInterrupt raised inside torch's C++ loader aborts the process
# with a C++ message ("terminate called after throwing ... KeyboardInterrupt") that no except clause sees.
_WORKER_BOOT = """import signal, sys
interrupted = []
signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
from peftlab.lab.runner import worker_main
signal.signal(signal.SIGINT, signal.default_int_handler)
if interrupted:
    sys.exit(130)
sys.exit(worker_main(sys.argv[1:]))
"""
INTERRUPT_GRACE_SECONDS = 60  # a worker saves its result after Ctrl-C; a checkpoint being written may need a while


_held_locks: dict[str, int] = {}


def lock(output_dir: str) -> None:
    """Hold the study folder ``output_dir`` until this process ends; a second ``train`` or ``compare``
    into it is refused, naming the process that holds it (two studies in one folder would share run
    folders and overwrite each other's results.json). An advisory ``flock`` on the folder itself: no
    file to leave behind, and released by the kernel however the holder ends."""
    import fcntl

    from peftlab.errors import WorkbenchError

    path = os.path.realpath(output_dir)
    if path in _held_locks:
        return
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise WorkbenchError(f"{output_dir} is in use by another peftlab study ({holder}); wait for it to finish, "
                             f"or pass another --output-dir.") from None
    _held_locks[path] = fd


def _lock_holder(fd: int) -> str:
    """"pid N: COMMAND" of the process holding a flock on ``fd``'s inode, from /proc/locks (Linux), or a fallback."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if "FLOCK" in parts and len(parts) > 5 and parts[5].split(":")[-1] == str(inode):
                    pid = parts[4]
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        words = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid}: {words[:200]}"
    except OSError:
        pass
    return "another process"


def run_dir(experiment: Experiment, run: RunConfig) -> str:
    return os.path.join(experiment.output_dir, "runs", run.name)


def validate(runs: list[RunConfig]) -> None:
    """Raise on bad methods, options or data before any output exists."""
    from peftlab.config import TaskType
    from peftlab.errors import PeftConfigError, WorkbenchError
    from peftlab.lab.causal import template_for
    from peftlab.lab.setup import quant_config

    seen: set[str] = set()
    for run in runs:
        _check_positions(run)
        causal = run.task == "causal_lm"
        build_config(run.method, run.options, TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS)
        quant_config(run)
        key = json.dumps([run.data.__dict__, run.train.seed], sort_keys=True, default=str)
        if key not in seen:
            splits = load_splits(run.data, run.train.seed)
            seen.add(key)
            if causal:
                try:
                    template_for(run.data.label_names, splits.num_labels, run.data.prompt)
                except PeftConfigError as exc:
                    raise WorkbenchError(f"run {run.name}: {exc}") from None


def _check_positions(run: RunConfig) -> None:
    """data.max_length against a local model folder's positions, read from its config.json (no model
    loaded); other models are checked when the run loads them (setup.Prepared)."""
    import types

    from peftlab.errors import WorkbenchError
    from peftlab.lab.experiment import DataConfig
    from peftlab.lab.setup import usable_positions

    path = os.path.join(run.model, "config.json")
    if run.data.max_length == DataConfig.max_length or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        positions = usable_positions(types.SimpleNamespace(**text))
    except (OSError, ValueError, TypeError):
        return  # an unreadable config is reported when the run loads the model
    if positions is not None and run.data.max_length > positions:
        raise WorkbenchError(f"run {run.name}: data.max_length={run.data.max_length} is more than model {run.model!r} reads "
                             f"({positions} positions); use --max-length {positions} or less.")


def run_in_subprocess(run: RunConfig, folder: str) -> RunResult:
    """Train ``run`` in a fresh Python process; its result.json, or a failed record if it has none."""
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, "result.json")
    if os.path.exists(stale):
        os.unlink(stale)
    atomic_write_text(os.path.join(folder, RUN_SPEC_NAME), json.dumps(run.to_dict(), indent=2))
    env = dict(os.environ)
    # The worker must import this very peftlab (a source checkout may not be the installed one).
    src = os.path.dirname(os.path.dirname(os.path.abspath(peftlab.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, folder], env=env)
    try:
        proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the worker too (same process group): give it the moment it needs to record its run
        # as interrupted (result.json) and exit quietly, rather than killing it mid-write.
        try:
            proc.wait(timeout=INTERRUPT_GRACE_SECONDS)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise
    result = load_run(folder)
    if result is None:
        result = RunResult(name=run.name, method=run.method, status=FAILED, run=run.to_dict(),
                           error=f"the run's process exited with code {proc.returncode} before writing a result "
                                 f"(killed for memory? see the output above).")
    return result


def finish(experiment: Experiment, results: list[RunResult], command: list[str] | None,
           extra: dict | None = None) -> dict[str, str]:
    """Write results.json and rebuild the report from it."""
    save_study(experiment.output_dir, experiment.name, results, command, extra=extra)
    return report.build(experiment.output_dir)


class Study:
    """Runs a planned study (groups of seeds and sweeps), reusing cached runs, saving as it goes.

    ``estimates``: each run's estimated seconds in training order, reused runs left out
    (:func:`peftlab.lab.budget.plan`); the study line before each run tells the time left from them,
    scaled by how long the finished runs took against their estimates.
    """

    def __init__(self, experiment: Experiment, groups: list, command: list[str] | None, use_cache: bool = True,
                 estimates: list[float] | None = None) -> None:
        self.experiment, self.groups, self.command, self.use_cache = experiment, groups, command, use_cache
        self.results: dict[str, RunResult] = {}
        self.selection: dict[str, dict] = {}
        self.trained: list[str] = []
        self.reused: list[str] = []
        self.estimates = estimates
        self.clock = time.monotonic
        self.started = self.clock()
        self.spent: list[float] = []  # wall seconds of each trained run

    def progress_line(self, run: RunConfig) -> str:
        """``run 2 of 9: lora.s1 (lora), 4m10s elapsed, about 12m left``: where the study stands."""
        k = len(self.trained) + 1
        estimates = self.estimates or []
        of = f" of {max(len(estimates), k)}" if self.estimates is not None else ""
        line = f"run {k}{of}: {run.name} ({run.method}), {duration(self.clock() - self.started)} elapsed"
        ahead = estimates[k - 1:]
        if ahead:
            done = estimates[:len(self.spent)]
            scale = sum(self.spent) / sum(done) if done and sum(done) > 0 else 1.0
            line += f", about {duration(scale * sum(ahead))} left"
            line += " (probe estimate)" if not done else f" (probe estimate scaled x{scale:.2g} by the runs so far)"
        return line

    def extra(self) -> dict:
        """Study-level records for results.json: seeds, each group's final runs, the sweep choices."""
        groups = {}
        for g in self.groups:
            chosen = self.selection[g.name]["setting"] if g.name in self.selection else g.settings[0]
            if chosen is not None:  # None: every setting of the sweep failed
                groups[g.name] = [r.name for r in g.final_runs(chosen)]
        seeded = any(g.seeded for g in self.groups)
        return {"seeds": self.groups[0].seeds if seeded else None, "selection": self.selection, "groups": groups}

    def one(self, run: RunConfig) -> RunResult:
        folder = run_dir(self.experiment, run)
        key = cache.run_key(run)
        hit = cache.cached(folder, key) if self.use_cache else None
        if hit is not None:
            print(f"== {run.name}: reused (finished earlier with the same config, data and code)", flush=True)
            self.results[run.name] = hit
            self.reused.append(run.name)
            return hit
        print(f"== {self.progress_line(run)}", flush=True)
        started = self.clock()
        result = run_in_subprocess(run, folder)
        result.config_hash = key
        save_run(result, folder)
        self.spent.append(self.clock() - started)
        print(f"== {run.name}: {result.status}" + (f", accuracy {result.accuracy:.4f}" if result.accuracy is not None else "")
              + f" in {duration(self.spent[-1])}" + (f" ({result.error})" if result.error else ""), flush=True)
        self.results[run.name] = result
        self.trained.append(run.name)
        save_study(self.experiment.output_dir, self.experiment.name, list(self.results.values()), self.command, extra=self.extra())
        return result

    def run(self) -> dict[str, str]:
        from peftlab.lab import sweep

        for group in self.groups:
            setting = group.settings[0]
            if group.swept:
                for run in group.sweep_runs():
                    self.one(run)
                setting, curve = sweep.choose(group, self.results)
                self.selection[group.name] = {"setting": setting, "dev_curve": curve, "seed": group.seeds[0],
                                              "metric": "dev accuracy at the best epoch"}
                if setting is None:  # every setting failed; the report lists why
                    continue
            for run in group.final_runs(setting):
                self.one(run)
        return finish(self.experiment, list(self.results.values()), self.command, extra=self.extra())

"""Seeds and sweeps: expand each run of a study into its repeats; choose the best setting on dev.

A run of the file becomes a *group*. With ``sweep: {learning_rate: [...]}`` (study-wide, per run,
or ``--sweep``) the group first trains every setting of the grid at the first seed and picks the
one with the best dev accuracy; that setting is then trained with every seed of ``seeds:``
(``--seeds``). The first seed's run at the chosen setting is the sweep's own run, reused through
the result cache. A sweep needs a dev set (``data.dev_split``), so that the reported test
accuracy never took part in the choice.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from peftlab.errors import WorkbenchError
from peftlab.lab.experiment import Experiment, RunConfig, TrainConfig, _coerce
from peftlab.lab.results import OK, RunResult

DEFAULT = "default"  # sweep value: the method's own learning-rate grid from the registry
SHORT = {"learning_rate": "lr", "head_learning_rate": "hlr", "weight_decay": "wd", "warmup_ratio": "wu",
         "epochs": "ep", "batch_size": "bs", "max_steps": "steps", "gradient_accumulation_steps": "ga"}
# Train settings that are not hyperparameters of the method: sweeping them compares nothing.
NOT_SWEPT = ("seed", "cpu", "progress", "keep_checkpoints", "save_steps", "logging_steps", "eval_batch_size")
MAX_SEEDS = 100


@dataclass
class Group:
    """One run of the file with its grid of settings and its seeds."""

    base: RunConfig
    settings: list[dict[str, Any]]  # [{}] when nothing is swept
    seeds: list[int]
    seeded: bool  # seeds were asked for: run names end in .s<seed>

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def swept(self) -> bool:
        return len(self.settings) > 1

    def run(self, setting: dict[str, Any], seed: int) -> RunConfig:
        run = copy.deepcopy(self.base)
        for key, value in setting.items():
            setattr(run.train, key, value)
        run.train.seed = seed
        run.group, run.setting = self.base.name, dict(setting)
        tags = "".join(f".{SHORT.get(k, k)}{_tag(v)}" for k, v in setting.items())
        run.name = self.base.name + tags + (f".s{seed}" if self.seeded else "")
        return run

    def sweep_runs(self) -> list[RunConfig]:
        return [self.run(s, self.seeds[0]) for s in self.settings] if self.swept else []

    def final_runs(self, setting: dict[str, Any]) -> list[RunConfig]:
        return [self.run(setting, seed) for seed in self.seeds]


def _tag(value: Any) -> str:
    return format(value, "g").replace("+", "") if isinstance(value, float) else str(value)


def parse_seeds(value: Any) -> list[int] | None:
    """``3`` -> [0, 1, 2]; ``[0, 5]`` or "0,5" -> [0, 5]; None stays None (one run at train.seed)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise WorkbenchError(f"seeds {value!r} must be a count (3) or a comma-separated list of integers (0,1,2).") from None
        value = numbers[0] if len(numbers) == 1 else numbers
    if isinstance(value, bool):
        raise WorkbenchError(f"seeds must be a count or a list of integers, got {value!r}.")
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEEDS:
            raise WorkbenchError(f"seeds: {value} repeats; give between 1 and {MAX_SEEDS} (e.g. 3).")
        return list(range(value))
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise WorkbenchError(f"seeds must be a count (3) or a list of integers ([0, 1, 2]), got {value!r}.")
    if len(set(value)) != len(value):
        raise WorkbenchError(f"seeds {value} repeat a seed; list each once.")
    return list(value)


def parse_sweep_flags(pairs: list[str] | None) -> dict[str, Any]:
    """``--sweep learning_rate=1e-4,3e-4`` (repeatable); ``--sweep learning_rate`` = the method's default grid."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, values = pair.partition("=")
        key = key.strip()
        if not key:
            raise WorkbenchError(f"--sweep {pair!r} is not KEY=V1,V2,... (e.g. --sweep learning_rate=1e-4,3e-4,1e-3).")
        if not sep or values.strip() in ("", DEFAULT):
            out[key] = DEFAULT
            continue
        try:
            out[key] = [_number(yaml.safe_load(v)) for v in values.split(",") if v.strip()]
        except yaml.YAMLError:
            raise WorkbenchError(f"--sweep {pair!r}: a value is not valid YAML.") from None
    return out


def _number(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as a string; such values are numbers here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def default_learning_rates(method: str) -> tuple[float, ...]:
    """The method's learning-rate grid: the registry's ``MethodSpec.learning_rates`` (full: lab's)."""
    from peftlab.lab.methods import FULL_LEARNING_RATES, resolve_method
    from peftlab.registry import method_for

    key = resolve_method(method)
    grid = FULL_LEARNING_RATES if key is None else method_for(key).learning_rates
    if not grid:
        raise WorkbenchError(f"method {method!r} registers no default learning-rate grid; list the values, "
                             f"e.g. sweep: {{learning_rate: [1.0e-4, 1.0e-3]}}.")
    return tuple(grid)


def grid(run: RunConfig, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the swept values for ``run`` (checked and typed like train settings)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    axes: list[tuple[str, list[Any]]] = []
    for key, values in sweep.items():
        if key not in fields or key in NOT_SWEPT:
            valid = sorted(fields - set(NOT_SWEPT))
            hint = " (repeat runs with seeds: instead)" if key == "seed" else ""
            raise WorkbenchError(f"cannot sweep {key!r}{hint}; sweepable train settings: {valid}.")
        if values == DEFAULT:
            if key != "learning_rate":
                raise WorkbenchError(f"only learning_rate has a default grid; list the values of {key}.")
            values = list(default_learning_rates(run.method))
        if not isinstance(values, list) or not values:
            raise WorkbenchError(f"sweep.{key} must be a non-empty list of values (or 'default' for learning_rate), got {values!r}.")
        typed = [_coerce("sweep", key, v, getattr(defaults, key)) for v in values]
        axes.append((key, list(dict.fromkeys(typed))))
    settings = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]
    for setting in settings:
        dataclasses.replace(run.train, **setting)  # each value checked as a train setting is (TrainConfig.__post_init__)
    return settings


def plan(experiment: Experiment, seeds: Any = None, sweep: dict[str, Any] | None = None) -> list[Group]:
    """The study's groups; ``seeds`` / ``sweep`` from the command line win over the file's."""
    chosen_seeds = parse_seeds(seeds if seeds is not None else experiment.seeds)
    groups = []
    for run in experiment.runs:
        settings = grid(run, {**experiment.sweeps.get(run.name, {}), **(sweep or {})})
        if len(settings) > 1 and run.data.dev_split is None:
            raise WorkbenchError(f"run {run.name!r} sweeps {sorted(settings[0])}: a sweep chooses on a dev set that the "
                                 f"reported number never saw; set data.dev_split (e.g. 0.1, or --dev-split 0.1).")
        groups.append(Group(run, settings, chosen_seeds or [run.train.seed], seeded=chosen_seeds is not None))
    return groups


def dev_score(result: RunResult | None) -> float | None:
    """What a sweep maximises: dev accuracy at the run's best epoch (None for a failed run)."""
    if result is None or result.status != OK:
        return None
    return result.dev_accuracy


def choose(group: Group, results: dict[str, RunResult]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(best setting or None when every sweep run failed, the dev curve as [{setting, dev_accuracy, run}])."""
    curve = []
    for run in group.sweep_runs():
        curve.append({"setting": run.setting, "dev_accuracy": dev_score(results.get(run.name)), "run": run.name})
    scored = [c for c in curve if c["dev_accuracy"] is not None]
    if not scored:
        return None, curve
    best = max(scored, key=lambda c: c["dev_accuracy"])  # ties: the first in grid order
    return dict(best["setting"]), curve

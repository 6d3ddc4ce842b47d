"""The peft oracle on workbench runs: one run trained by peftlab and by Hugging Face peft.

A method that lands far below the others in a study (prompt tuning, AdaLoRA on MiniLM/SST-2) is
either weak there or broken in peftlab. This trains the same run — config, data, seed, learning
rate, Trainer settings, the workbench's own training path — twice per seed: once as the
workbench does, once with ``peftlab.get_peft_model`` swapped for peft's (AdaLoRA's budget step
then calls peft's ``update_and_allocate``; peft adds the orthogonality term to the loss itself;
peft's ``modules_to_save`` copies get the run's ``head_learning_rate`` as peftlab's do — without
that the head of a peft model trains at the adapter's rate, 0.1 for prompt tuning, and stays at
chance).
It prints both test accuracies per seed and the paired comparison the workbench report uses
(paired bootstrap over test sentences + sign across seeds): the oracle agrees when the
difference is not marked.

Run (from the repository root; takes about two minutes per run and seed on 2 cores):
  python benchmarks/workbench_oracle.py examples/minilm_sst2_all_methods_seeds.yaml \
      --runs prompt_tuning,adalora --seeds 0,1,2 --study-dir results/minilm-sst2-all-methods-seeds
``--study-dir`` takes each run's learning rate from the study's choice on dev; ``--lr RUN=VALUE``
sets one by hand. Results: benchmarks/results/workbench_oracle.json (with commit, environment and load).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


class _PeftAdaLoraBudget:
    """peft's AdaLoRA budget step inside the Trainer: after optimizer.step(), before zero_grad()."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:  # every other TrainerCallback event is a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.base_model.update_and_allocate(state.global_step)


@contextlib.contextmanager
def peft_backend() -> Iterator[None]:
    """Within: the workbench builds peft models (same config values) and peft's AdaLoRA callback."""
    import peft

    import peftlab
    from peftlab.lab import runner, trainer

    def get_peft_model(model: Any, config: Any) -> Any:
        values = config.to_dict()
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        theirs_cls = PEFT_TYPE_TO_CONFIG_MAPPING[values["peft_type"]]
        known = {f.name for f in dataclasses.fields(theirs_cls)}
        theirs = peft.get_peft_model(model, theirs_cls(**{k: v for k, v in values.items() if k in known}))
        for cfg in theirs.peft_config.values():  # peft keeps module names as sets; the run record is JSON
            for key, value in vars(cfg).items():
                if isinstance(value, set):
                    setattr(cfg, key, sorted(value))
        return theirs

    def callbacks(config: Any, model: Any) -> list[Any]:
        return [_PeftAdaLoraBudget(model)] if config is not None and config.peft_type.value == "ADALORA" else []

    def head_parameters(model: Any) -> set[int]:  # the head_learning_rate group: peft's wrapped copies
        from peft.utils import ModulesToSaveWrapper

        return {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.modules_to_save.parameters()}

    saved = (peftlab.__dict__.get("get_peft_model"), runner.trainer_callbacks, trainer.head_parameters)
    peftlab.get_peft_model, runner.trainer_callbacks, trainer.head_parameters = get_peft_model, callbacks, head_parameters
    try:
        yield
    finally:
        if saved[0] is None:
            del peftlab.get_peft_model
        else:
            peftlab.get_peft_model = saved[0]
        runner.trainer_callbacks, trainer.head_parameters = saved[1], saved[2]


def chosen_rates(study_dir: str) -> dict[str, float]:
    from peftlab.lab.results import load_study

    _, _, raw = load_study(study_dir)
    return {group: choice["setting"]["learning_rate"] for group, choice in (raw.get("selection") or {}).items()
            if choice.get("setting")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--runs", required=True, help="comma-separated run names of the experiment file")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--study-dir", help="a finished study whose learning-rate choice on dev to use")
    parser.add_argument("--lr", action="append", default=[], help="RUN=VALUE, overrides --study-dir")
    parser.add_argument("--name", default="workbench_oracle", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import yaml

    from peftlab.lab import stats
    from peftlab.lab.experiment import build_experiment
    from peftlab.lab.runner import execute

    with open(args.experiment, encoding="utf-8") as fh:
        spec = yaml.safe_load(fh)
    experiment = build_experiment(spec, base_dir=os.path.dirname(os.path.abspath(args.experiment)))
    rates = chosen_rates(args.study_dir) if args.study_dir else {}
    rates.update({k: float(v) for k, v in (item.split("=", 1) for item in args.lr)})
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict[str, Any] = {"experiment": args.experiment, "seeds": seeds, "runs": {}}
    for name in args.runs.split(","):
        base = next((r for r in experiment.runs if r.name == name), None)
        if base is None:
            parser.error(f"no run named {name!r} in {args.experiment}")
        if name not in rates:
            parser.error(f"no learning rate for {name!r}: pass --study-dir or --lr {name}=VALUE")
        correct: dict[str, dict[int, np.ndarray]] = {"peftlab": {}, "peft": {}}
        rows = []
        for seed in seeds:
            run = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed, learning_rate=rates[name]))
            row: dict[str, Any] = {"seed": seed}
            for library in ("peftlab", "peft"):
                with tempfile.TemporaryDirectory() as folder, (peft_backend() if library == "peft" else contextlib.nullcontext()):
                    result = execute(run, folder)
                if result.status != "ok":
                    raise SystemExit(f"{name} seed {seed} with {library}: {result.status}: {result.error}")
                correct[library][seed] = np.asarray(result.predictions) == np.asarray(result.labels)
                row[library] = {"test_accuracy": result.accuracy, "dev_accuracy": result.dev_accuracy,
                                "best_epoch": result.best_epoch, "trainable_params": result.trainable_params}
                print(f"{name} seed {seed} {library}: test accuracy {100 * result.accuracy:.2f}", flush=True)
            rows.append(row)
        cmp = stats.compare(correct["peftlab"], correct["peft"])
        report["runs"][name] = {
            "learning_rate": rates[name], "per_seed": rows,
            "peftlab_mean": float(np.mean([r["peftlab"]["test_accuracy"] for r in rows])),
            "peft_mean": float(np.mean([r["peft"]["test_accuracy"] for r in rows])),
            "difference": cmp.diff, "interval_95": [cmp.low, cmp.high], "seeds_agree_in_sign": cmp.seeds_agree,
            "oracle_agrees": not cmp.marked,
        }
        print(json.dumps({name: report["runs"][name]}, indent=2), flush=True)
    write_results(args.name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

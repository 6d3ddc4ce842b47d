"""``peftlab``: train, compare, inspect and report from the command line.

    peftlab train   [EXPERIMENT.yaml] [--method lora --option r=8 ...] [--resume]
    peftlab compare EXPERIMENT.yaml | --methods full,lora,ia3 --model M --dataset D
    peftlab inspect MODEL
    peftlab report  RESULTS_DIR
    peftlab generate ADAPTER_OR_MODEL_DIR --prompt "Review: ...\nSentiment:"

``--task causal-lm`` trains a causal LM to answer with the label word; ``--quantize 4bit`` loads
the frozen base in 4 bits (QLoRA). Models may be aliases (smollm2-135m, minilm).

Flags override the experiment file. Bad input ends with one ``peftlab: error: ...`` line
and exit status 2, before anything is written; a failed run gives exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from peftlab.errors import PeftlabError, WorkbenchError

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# flag dest -> (section, key) in the experiment
_DATA_FLAGS = {"dataset": "dataset", "text_column": "text_column", "label_column": "label_column", "max_length": "max_length",
               "validation_split": "validation_split", "eval_split": "eval_split",
               "max_train_samples": "max_train_samples", "max_eval_samples": "max_eval_samples",
               "dev_split": "dev_split", "split_seed": "split_seed"}
_TRAIN_FLAGS = {"epochs": "epochs", "max_steps": "max_steps", "lr": "learning_rate", "head_lr": "head_learning_rate", "batch_size": "batch_size",
                "eval_batch_size": "eval_batch_size", "weight_decay": "weight_decay", "warmup_ratio": "warmup_ratio",
                "seed": "seed", "save_steps": "save_steps", "logging_steps": "logging_steps",
                "gradient_accumulation_steps": "gradient_accumulation_steps"}


def _experiment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", help="YAML/JSON experiment file (see examples/)")
    p.add_argument("--name", help="study name (default: from the file)")
    p.add_argument("--output-dir", help="where results go (default: results/<name>)")
    p.add_argument("--model", help="model folder, hub id, alias (smollm2-135m, minilm) or an installed model package")
    p.add_argument("--task", choices=["classification", "causal-lm", "causal_lm"],
                   help="classification head (default) or causal-lm: generate the label word after a prompt")
    p.add_argument("--quantize", choices=["4bit", "8bit", "none"],
                   help="load the frozen base in 4 or 8 bits (QLoRA; adapter methods only)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="local folder/file (JSONL, CSV, Parquet) or hub data set name")
    g.add_argument("--text-column")
    g.add_argument("--label-column")
    g.add_argument("--max-length", type=int)
    g.add_argument("--validation-split", type=float, help="held-out fraction of train when there is no validation split")
    g.add_argument("--eval-split", help="split to evaluate on (default validation)")
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-eval-samples", type=int, help="cap on evaluation rows (dev and test each in held-out mode)")
    g.add_argument("--dev-split", type=float, help="held-out mode: fraction (or number) of train rows carved out as the dev "
                                                   "set for all choices; the eval split then becomes the test set")
    g.add_argument("--split-seed", type=int, help="seed of the dev/test carving (default 0, the same for every run seed)")
    g.add_argument("--label-names", help="causal-lm: comma-separated answer words, one per label (negative,positive)")
    g.add_argument("--prompt", help="causal-lm: prompt with {text}; the answer follows it")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--head-lr", type=float, help="learning rate of the trained head / modules_to_save (default: --lr)")
    t.add_argument("--batch-size", type=int, help="per process")
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-ratio", type=float)
    t.add_argument("--gradient-accumulation-steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: each epoch)")
    t.add_argument("--logging-steps", type=int)
    t.add_argument("--keep-checkpoints", action="store_true", default=None)
    t.add_argument("--cpu", action="store_true", default=None, help="train on CPU even if a GPU is present")
    t.add_argument("--bf16", action="store_true", default=None,
                   help="mixed precision: compute in bfloat16 under autocast (weights and optimizer stay fp32)")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward: less memory, slower steps")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="plain log lines instead of a live progress line (automatic when stdout is not a terminal)")
    _verbose_flag(p, default=argparse.SUPPRESS)


def _verbose_flag(p: argparse.ArgumentParser, default: object = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show third-party logs (transformers' load reports and the Trainer's log dicts, bitsandbytes notices)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="peftlab", description="Train and compare parameter-efficient fine-tuning methods.")
    _verbose_flag(root)
    sub = root.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one method")
    _experiment_flags(train)
    train.add_argument("--method", help="method name (full, lora, ia3, ...); replaces the file's runs")
    train.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="method option, value in YAML syntax (r=8, target_modules=[query,value]); repeatable")
    train.add_argument("--run", help="which run of the experiment file to train")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")

    compare = sub.add_parser("compare", help="train several methods on the same data and seed, then report")
    _experiment_flags(compare)
    compare.add_argument("--methods", help="comma-separated run names or methods to keep (or, without a file, to run)")
    compare.add_argument("--seeds", help="repeat every run: a count (3 = seeds 0,1,2) or a list (0,1,2); wins over seeds: in the file")
    compare.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                         help="sweep a train setting, best on dev carried to the seeds (learning_rate=1e-4,3e-4,1e-3; "
                              "--sweep learning_rate alone: each method's default grid); needs --dev-split; repeatable")
    compare.add_argument("--dry-run", action="store_true", help="print the runs and an estimated time from a short timed probe; train nothing")
    compare.add_argument("--no-cache", dest="use_cache", action="store_false",
                         help="train every run again even when an identical finished run is on disk")

    inspect = sub.add_parser("inspect", help="list a model's adaptable modules and the default targets")
    inspect.add_argument("model")
    inspect.add_argument("--all", action="store_true", help="list every module, not one block's worth")

    rep = sub.add_parser("report", help="rebuild the report from saved results")
    rep.add_argument("results_dir")

    gen = sub.add_parser("generate", help="continue a prompt with a trained causal-LM adapter or model folder")
    gen.add_argument("model_dir", help="an adapter folder (adapter_config.json) or a model folder/alias")
    gen.add_argument("--prompt", required=True, help="text to continue (use $'...\\n...' in bash for a newline)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--base-model", help="base model of an adapter (default: the one named in adapter_config.json)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    return root


# ----- building the experiment ---------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    data = {key: getattr(args, dest) for dest, key in _DATA_FLAGS.items() if getattr(args, dest) is not None}
    train = {key: getattr(args, dest) for dest, key in _TRAIN_FLAGS.items() if getattr(args, dest) is not None}
    for flag in ("keep_checkpoints", "cpu", "bf16", "gradient_checkpointing", "progress"):
        if getattr(args, flag) is not None:
            train[flag] = getattr(args, flag)
    if args.label_names:
        data["label_names"] = [w.strip() for w in args.label_names.split(",") if w.strip()]
    if args.prompt:
        data["prompt"] = args.prompt.replace("\\n", "\n")  # a literal \n on the command line means a newline
    top = {k: getattr(args, k) for k in ("name", "output_dir") if getattr(args, k)}
    out: dict[str, Any] = {"data": data, "train": train, "top": top, "model": args.model}
    if args.task:
        out["task"] = args.task
    if args.quantize:
        out["quantize"] = args.quantize
    return out


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise WorkbenchError(f"--option {pair!r} is not KEY=VALUE (e.g. --option r=8).")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
            raise WorkbenchError(f"--option {pair[:80]!r}: the value is not valid YAML.") from None
    return options


def _load_experiment(args: argparse.Namespace, selected_methods: list[str] | None = None):  # noqa: ANN202
    from peftlab.lab.experiment import build_experiment, load_file

    if args.experiment:
        spec = load_file(args.experiment)
        base_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.experiment)))
        default_name = os.path.splitext(os.path.basename(args.experiment))[0]
    else:
        spec, base_dir, default_name = {}, None, "study"
    if selected_methods is not None and (not args.experiment or "runs" not in spec):
        spec["runs"] = [{"name": m, "method": m} for m in selected_methods]
        selected_methods = None
    if getattr(args, "method", None):
        spec["runs"] = [{"name": args.method, "method": args.method, "options": _parse_options(args.option)}]
        spec.pop("method", None)
        spec.pop("options", None)
    elif getattr(args, "option", None):
        raise WorkbenchError("--option needs --method (options belong to one method).")
    experiment = build_experiment(spec, overrides=_overrides(args), base_dir=base_dir, default_name=default_name)
    if selected_methods is not None:
        experiment.runs = _select_runs(experiment.runs, selected_methods)
    return experiment


def _select_runs(runs: list, selectors: list[str]) -> list:
    """Runs kept by ``--methods``: a selector that names a run picks that run only (``lora`` is
    not also ``dora``, whose method is lora too); any other selector picks every run of that method."""
    names = {r.name for r in runs}
    missing = [m for m in selectors if not any(m in (r.name, r.method) for r in runs)]
    if missing:
        raise WorkbenchError(f"--methods {missing} match no run; runs in the file: {[r.name for r in runs]}.")
    return [r for r in runs if r.name in selectors or (r.method in selectors and r.method not in names)]


# ----- commands ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    if not args.experiment and not args.method:
        raise WorkbenchError("train needs an experiment file or --method NAME (with --model and --dataset); "
                             "e.g. peftlab train examples/minilm_sst2_compare.yaml --run lora.")
    experiment = _load_experiment(args)  # bad input is reported before torch and transformers load
    from peftlab.lab import preflight

    runs = experiment.runs
    if args.run:
        runs = [r for r in runs if r.name == args.run]
        if not runs:
            raise WorkbenchError(f"--run {args.run!r} is not in the experiment; runs: {[r.name for r in experiment.runs]}.")
    if len(runs) != 1:
        raise WorkbenchError(f"the experiment has {len(runs)} runs ({', '.join(r.name for r in runs)}); "
                             f"pick one with --run NAME, or use 'peftlab compare'.")
    run = runs[0]
    preflight.check([run])
    from peftlab.lab import study
    from peftlab.lab.results import OK
    from peftlab.lab.runner import execute, is_main_process
    from peftlab.lab.setup import Prepared

    folder = study.run_dir(experiment, run)
    if args.resume:
        from peftlab.lab.checkpoints import last_checkpoint, torn_checkpoints

        if last_checkpoint(folder) is None:
            torn = [os.path.basename(p) for p in torn_checkpoints(folder)]
            raise WorkbenchError(f"--resume: no checkpoint written completely in {folder}/checkpoints"
                                 f"{f' ({len(torn)} cut short by a kill: {torn})' if torn else ''}; "
                                 f"start the run without --resume.")
    prepared = Prepared(run)  # raises on bad input before anything is written
    if is_main_process():  # under torchrun, process 0 holds it for all
        study.lock(experiment.output_dir)  # held until exit: a second study into this folder is refused
    result = execute(run, folder, resume=args.resume, prepared=prepared)
    if is_main_process():
        experiment.runs = [run]
        outputs = study.finish(experiment, [result], sys.argv)
        which = f"test accuracy (best epoch on dev: {result.best_epoch})" if result.test_source else "accuracy"
        print(f"{run.name}: {result.status}" + (f", {which} {result.accuracy:.4f}" if result.accuracy is not None else ""))
        if result.error:
            print(f"peftlab: {result.error}", file=sys.stderr)
        print(f"report: {outputs['html']}")
    return EXIT_OK if result.status == OK else EXIT_RUN_FAILED


def cmd_compare(args: argparse.Namespace) -> int:
    selected = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if not args.experiment and not selected:
        raise WorkbenchError("compare needs an experiment file or --methods full,lora,... with --model and --dataset.")
    experiment = _load_experiment(args, selected)  # bad input is reported before torch and transformers load
    from peftlab.lab import preflight, study, sweep
    from peftlab.lab.results import OK

    groups = sweep.plan(experiment, args.seeds, sweep.parse_sweep_flags(args.sweep))
    first_runs = [g.run(g.settings[0], seed) for g in groups for seed in g.seeds]
    study.validate(first_runs)
    preflight.check(first_runs)  # missing packages and unloadable models, before any run trains
    if args.dry_run:
        from peftlab.lab.budget import dry_run

        print(dry_run(experiment, groups, use_cache=args.use_cache))
        return EXIT_OK
    study.lock(experiment.output_dir)  # held until exit: a second study into this folder is refused
    runner = study.Study(experiment, groups, sys.argv, use_cache=args.use_cache)
    runner.estimates = _estimates(experiment, groups, args)  # after the study's clock started: the probe counts as elapsed
    try:
        outputs = runner.run()
    except KeyboardInterrupt:
        print(f"\npeftlab: interrupted; {len(runner.results)} finished runs are saved in {experiment.output_dir}. "
              f"Run the same command again to train only what is missing.", file=sys.stderr)
        return 130
    results = list(runner.results.values())
    print(f"{len(runner.trained)} runs trained, {len(runner.reused)} reused")
    print(f"results: {os.path.join(experiment.output_dir, 'results.json')}\nreport: {outputs['html']}")
    return EXIT_OK if all(r.status == OK for r in results) else EXIT_RUN_FAILED


def _estimates(experiment: Any, groups: list, args: argparse.Namespace) -> list[float] | None:
    """Each run's estimated seconds from the dry run's probe, for the study line; None if probing fails
    (the runs then report that failure themselves)."""
    from peftlab.lab.budget import PROBE_STEPS, plan

    print(f"estimating the study's time ({PROBE_STEPS}-step probe per model and method)", flush=True)
    try:
        return [p.seconds for p in plan(experiment, groups, use_cache=args.use_cache) if p.seconds is not None]
    except Exception:  # noqa: BLE001 - an estimate is a convenience, never a reason to stop
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftlab.lab.preflight import check_model

    check_model(args.model)  # an unknown name fails at once instead of after hub retries
    from peftlab.lab.inspect import describe

    print(describe(args.model, show_all=args.all))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from peftlab.lab import report

    outputs = report.build(args.results_dir)
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from peftlab.lab.causal import generate

    if args.max_new_tokens < 1:
        raise WorkbenchError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    looks_like_path = os.sep in args.model_dir or args.model_dir.startswith(".")
    if looks_like_path and not os.path.isdir(args.model_dir):
        raise WorkbenchError(f"{args.model_dir} is not a folder; pass the adapter/ or model/ folder of a run "
                             f"(e.g. results/STUDY/RUN/adapter) or a model alias.")
    if os.path.isdir(args.model_dir) and not any(os.path.isfile(os.path.join(args.model_dir, f))
                                                 for f in ("adapter_config.json", "config.json")):
        raise WorkbenchError(f"{args.model_dir} holds neither adapter_config.json nor config.json; pass a run's "
                             f"adapter/ or model/ folder.")
    try:
        text = generate(args.model_dir, args.prompt.replace("\\n", "\n"), max_new_tokens=args.max_new_tokens,
                        base_model=args.base_model, do_sample=args.sample, temperature=args.temperature)
    except (OSError, ValueError) as exc:  # a base model folder that is gone or incomplete, or needs remote code
        if isinstance(exc, PeftlabError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WorkbenchError(f"cannot load the model for {args.model_dir}: {first}; pass --base-model PATH_OR_ALIAS.") from None
    print(text)
    return EXIT_OK


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "inspect": cmd_inspect, "report": cmd_report,
            "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from peftlab.lab import quiet

    quiet.apply(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\npeftlab: interrupted (Ctrl-C); what was saved is kept: a run that had started training says so in its "
              "result.json, and the same command with --resume continues it from its last checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PeftlabError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"peftlab: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, UnicodeError, RecursionError, MemoryError) as exc:
        # Input the checks above did not foresee (an unreadable file, a path that is a file, input too
        # deep or too large): still one line and exit 2, never a traceback. Failures during training
        # never get here: they are the run's recorded result (exit 1).
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        print(f"peftlab: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

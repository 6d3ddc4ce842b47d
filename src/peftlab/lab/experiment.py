"""Experiment files: YAML (or JSON) that name a model, a data set, training settings and runs.

Precedence, lowest to highest: the defaults in these dataclasses, the file's top-level
``model`` / ``data`` / ``train`` sections, a run's own ``model`` / ``data`` / ``train`` keys,
and command-line flags. Every section is a dataclass, so a misspelt key is an error that
lists the valid ones instead of a setting silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import WorkbenchError


@dataclass
class DataConfig:
    """Where the examples come from and how they become model inputs.

    Args:
        dataset: a local folder (train/validation/test files), one local file
            (.jsonl/.json/.csv/.parquet; used as the training split), or a Hugging Face hub name.
        text_column / label_column: column names; labels must be integers 0..K-1.
        max_length: tokens kept per example (longer texts are truncated); at most the model's
            positions (the default, 128, becomes the model's count on a model that reads fewer).
        validation_split: fraction of the training rows held out for validation when the
            source has no split named ``eval_split`` (0.2 gives the classic 4:1 split).
        eval_split: the split evaluated after each epoch ("validation"; "test" for sources
            that only have train/test and where the test split is wanted instead).
        max_train_samples / max_eval_samples: seeded random subsample (None keeps all).
        subset: configuration name of a hub data set (e.g. "sst2" of "glue").
        label_names: causal_lm task only: the answer word of each label (default
            [negative, positive] for two labels).
        prompt: causal_lm task only: the prompt with ``{text}`` (default
            "Review: {text}\\nSentiment:"); the answer follows it.
        dev_split: held-out mode: a fraction (below 1) or number of training rows carved out as
            the dev set (stratified); the per-epoch evaluation, the best epoch and sweeps use dev
            only, and the reported accuracy is on the ``eval_split`` split, now the test set, seen
            once at the end. None keeps one evaluation split (reported and used for choices).
        split_seed: seeds the dev/test carving and their subsampling, the same for every run
            seed so that seeds are compared on the same test rows.
    """

    dataset: str = ""
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    validation_split: float = 0.2
    eval_split: str = "validation"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    subset: str | None = None
    label_names: list[str] | None = None
    prompt: str | None = None
    dev_split: float | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        _at_least("data", "max_length", self.max_length, 1, "tokens kept per example")
        if not 0 < self.validation_split < 1:
            raise WorkbenchError(f"data.validation_split must be a fraction between 0 and 1 (e.g. 0.2), got {self.validation_split!r}.")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None:
                _at_least("data", key, getattr(self, key), 1, "rows, or leave it out to keep all")
        if self.dev_split is not None and not (0 < self.dev_split < 1 or (self.dev_split >= 1 and float(self.dev_split).is_integer())):
            raise WorkbenchError(f"data.dev_split must be a fraction between 0 and 1 or a whole number of rows, got {self.dev_split!r}.")
        _seed("data", "split_seed", self.split_seed)


@dataclass
class TrainConfig:
    """Trainer settings; one run's numbers are reproducible from these and the seed.

    Args:
        epochs: passes over the training rows.
        max_steps: stop after this many optimizer steps (overrides epochs when > 0).
        learning_rate / weight_decay / warmup_ratio / lr_scheduler: AdamW and its schedule.
        head_learning_rate: learning rate of the fully trained modules of an adapter run
            (classifier head, modules_to_save); None uses learning_rate.
        batch_size: examples per step per process (under DDP the global batch is this
            times the number of processes).
        eval_batch_size: examples per evaluation step.
        gradient_accumulation_steps: steps whose gradients are summed before an update.
        seed: seeds model init, data order, dropout and subsampling.
        save_steps: write a resumable checkpoint every this many steps (None: once per
            epoch); SIGTERM also writes one.
        keep_checkpoints: keep the checkpoints after a successful run (they are large).
        logging_steps: train-loss points per curve: one every this many steps.
        cpu: train on CPU even when a GPU is present.
        bf16: mixed precision: forward and backward under bfloat16 autocast, weights and optimizer
            state in fp32. On CPUs with AVX512-BF16/AMX a MiniLM training step takes ~0.7x the
            fp32 time (docs/benchmarks.md); accuracy can differ slightly from fp32.
        gradient_checkpointing: recompute each block's activations in backward instead of keeping
            them (transformers' activation checkpointing; adapters are recomputed with their block,
            same gradients). Less memory for long sequences, slower steps (docs/benchmarks.md).
        progress: redraw a live progress line on a terminal (false: plain log lines).
        group_by_length: draw each batch from examples of similar length (transformers'
            LengthGroupedSampler, seeded like the default order): far less padding on short texts,
            so faster steps (the acceptance study's SST-2 batches of 16: 14 tokens instead of 34).
    """

    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-3
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    seed: int = 0
    save_steps: int | None = None
    keep_checkpoints: bool = False
    logging_steps: int = 10
    cpu: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    progress: bool = True
    group_by_length: bool = False

    def __post_init__(self) -> None:
        """Every number checked here, when the experiment is read: a bad one would otherwise fail (or be
        silently reinterpreted) inside the trainer, after folders were written."""
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise WorkbenchError(f"train.epochs must be a positive number of passes (e.g. 3), got {self.epochs!r}.")
        if self.max_steps != -1:
            _at_least("train", "max_steps", self.max_steps, 1, "optimizer steps, or -1 to train for train.epochs")
        for key in ("learning_rate", "head_learning_rate"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise WorkbenchError(f"train.{key} must be a positive number (e.g. 1.0e-3), got {value!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise WorkbenchError(f"train.weight_decay must be zero or positive (e.g. 0.01), got {self.weight_decay!r}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise WorkbenchError(f"train.warmup_ratio is the fraction of steps spent warming up: between 0 and 1 (e.g. 0.1), "
                                 f"got {self.warmup_ratio!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise WorkbenchError(f"train.lr_scheduler {self.lr_scheduler!r} is not known; use one of: {', '.join(LR_SCHEDULERS)}.")
        _at_least("train", "batch_size", self.batch_size, 1, "examples per step")
        _at_least("train", "eval_batch_size", self.eval_batch_size, 1, "examples per evaluation step")
        _at_least("train", "gradient_accumulation_steps", self.gradient_accumulation_steps, 1, "steps per update (1: none)")
        _at_least("train", "logging_steps", self.logging_steps, 1, "steps between logged losses")
        if self.save_steps is not None:
            _at_least("train", "save_steps", self.save_steps, 1, "steps between checkpoints, or leave it out for one per epoch")
        _seed("train", "seed", self.seed)


# Schedules transformers' Trainer builds from the step count alone (others need settings the workbench lacks).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")


def _at_least(section: str, key: str, value: int, low: int, meaning: str) -> None:
    if value < low:
        raise WorkbenchError(f"{section}.{key} must be at least {low} ({meaning}), got {value!r}.")


def _seed(section: str, key: str, value: int) -> None:
    if not 0 <= value < 2**32:  # numpy's seed range, which transformers' set_seed uses
        raise WorkbenchError(f"{section}.{key} must be between 0 and 2**32 - 1, got {value!r}.")


TASKS = ("classification", "causal_lm")
QUANTIZE = {"4bit": 4, "8bit": 8}
# model-section keys besides name/quantize -> QuantConfig field (names as in transformers' BitsAndBytesConfig)
QUANT_OPTIONS = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                 "bnb_4bit_compute_dtype": "compute_dtype"}


@dataclass
class RunConfig:
    """One training run: a method with its options on a model and data set.

    ``task`` is "classification" (a classifier head) or "causal_lm" (the label is generated as a
    word after a prompt). ``quantize`` ("4bit"/"8bit") loads the frozen base quantized (QLoRA);
    ``quant_options`` holds the model section's bnb_4bit_* keys.
    """

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "classification"
    quantize: str | None = None
    quant_options: dict[str, Any] = field(default_factory=dict)
    # A seeded or swept study repeats one run of the file: ``group`` names that run, ``setting``
    # holds the swept train values of this repeat (the seed is train.seed).
    group: str = ""
    setting: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        return cls(
            name=data["name"],
            method=data["method"],
            options=dict(data.get("options") or {}),
            model=data.get("model", ""),
            data=_build(DataConfig, data.get("data") or {}, "data"),
            train=_build(TrainConfig, data.get("train") or {}, "train"),
            task=data.get("task", "classification"),
            quantize=data.get("quantize"),
            quant_options=dict(data.get("quant_options") or {}),
            group=data.get("group") or "",
            setting=dict(data.get("setting") or {}),
        )


@dataclass
class Experiment:
    """A study: its name, where its results go, and its runs (already merged with defaults).

    ``seeds`` and ``sweeps`` (run name -> train key -> values) are kept as written; ``peftlab.lab.sweep``
    checks them and expands each run into its repeats.
    """

    name: str
    output_dir: str
    runs: list[RunConfig]
    seeds: Any = None
    sweeps: dict[str, Any] = field(default_factory=dict)


MAX_EXPERIMENT_BYTES = 4 * 2**20
_TOP_KEYS = {"name", "output_dir", "model", "data", "train", "runs", "method", "options", "task", "seeds", "sweep"}
_RUN_KEYS = {"name", "method", "options", "model", "data", "train", "task", "sweep"}
_MODEL_KEYS = {"name", "quantize", *QUANT_OPTIONS}


def normalize_task(value: Any) -> str:
    """"causal-lm", "CAUSAL_LM" -> "causal_lm"; unknown tasks are an error listing the valid ones."""
    key = str(value).strip().lower().replace("-", "_")
    if key not in TASKS:
        raise WorkbenchError(f"unknown task {value!r}; choose one of: {', '.join(TASKS)} (causal-lm also accepted).")
    return key


def model_section(value: Any, where: str) -> dict[str, Any]:
    """A ``model:`` entry as a mapping: a string is its name; a mapping may add quantize / bnb_4bit_* keys."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise WorkbenchError(f"{where} must be a model name or a mapping with name/quantize, found {value!r}.")
    bad = sorted(set(value) - _MODEL_KEYS)
    if bad:
        raise WorkbenchError(f"unknown keys {bad} in {where}; valid keys: {sorted(_MODEL_KEYS)}.")
    return dict(value)


def normalize_quantize(value: Any) -> str | None:
    """"4bit" / "8bit" (also 4, 8, "4-bit"); None, "none", "no" and false mean not quantized."""
    if value is None or value is False or str(value).strip().lower() in ("none", "no", "off", "false", ""):
        return None
    key = str(value).strip().lower().replace("-", "").replace("_", "")
    key = key if key.endswith("bit") else key + "bit"
    if key not in QUANTIZE:
        raise WorkbenchError(f"quantize must be 4bit or 8bit (or none), got {value!r}.")
    return key


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON experiment file into a dict (no defaults applied yet)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"experiment file {path} does not exist; pass the path of a YAML file (see examples/).")
    if path.stat().st_size > MAX_EXPERIMENT_BYTES:
        raise WorkbenchError(f"{path} is larger than {MAX_EXPERIMENT_BYTES // 2**20} MiB; an experiment file is a few kB.")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise WorkbenchError(f"{path}:{line} is not UTF-8 text; save the file as UTF-8.") from None
    except RecursionError:
        raise WorkbenchError(f"{path} nests its sections too deeply to be an experiment file.") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise WorkbenchError(f"{at} is not valid YAML ({first}); fix the file.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path} must hold a mapping (model:, data:, train:, runs:), found {type(data).__name__}.")
    return data


def build_experiment(
    spec: dict[str, Any],
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    base_dir: str | os.PathLike | None = None,
    default_name: str = "study",
) -> Experiment:
    """Merge defaults, file sections, per-run keys and CLI ``overrides`` into an Experiment.

    ``overrides`` has the sections ``model`` (a string under key "model"), ``data``, ``train``
    and ``top`` (name, output_dir), plus ``task`` and ``quantize`` (present only when given on
    the command line); its values win over everything in the file.
    ``base_dir`` is where a relative data path is also looked up (the file's folder's parent,
    i.e. the repository root for files in examples/).
    """
    overrides = overrides or {}
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise WorkbenchError(f"unknown top-level keys {unknown} in the experiment; valid keys: {sorted(_TOP_KEYS)}.")
    top = overrides.get("top", {})
    name = str(top.get("name") or spec.get("name") or default_name)
    output_dir = str(top.get("output_dir") or spec.get("output_dir") or os.path.join("results", _slug(name)))
    check_output_dir(output_dir)
    runs_raw = spec.get("runs")
    if runs_raw is None:
        # A file without a runs list is one run described by top-level method/options.
        runs_raw = [{"name": spec.get("method") or "run", "method": spec.get("method"), "options": spec.get("options") or {}}]
    if not isinstance(runs_raw, list) or not runs_raw:
        raise WorkbenchError("'runs' must be a non-empty list of {name, method, options} entries.")
    runs: list[RunConfig] = []
    for index, raw in enumerate(runs_raw):
        if not isinstance(raw, dict):
            raise WorkbenchError(f"runs[{index}] must be a mapping with at least 'method', found {raw!r}.")
        bad = sorted(set(raw) - _RUN_KEYS)
        if bad:
            raise WorkbenchError(f"unknown keys {bad} in runs[{index}]; valid keys: {sorted(_RUN_KEYS)}.")
        method = raw.get("method")
        if not method or not isinstance(method, str):
            raise WorkbenchError(f"runs[{index}] has no 'method'; give one, e.g. method: lora (or full).")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise WorkbenchError(f"runs[{index}].options must be a mapping of config fields, found {options!r}.")
        run_name = str(raw.get("name") or method)
        section = {**model_section(spec.get("model"), "model"), **model_section(raw.get("model"), f"runs[{index}].model")}
        if overrides.get("model"):
            section["name"] = overrides["model"]
        if "quantize" in overrides:
            section["quantize"] = overrides["quantize"]
        model = section.get("name")
        if not model:
            raise WorkbenchError("no model given; set 'model:' in the experiment or pass --model NAME_OR_PATH.")
        quantize = normalize_quantize(section.get("quantize"))
        quant_options = {k: section[k] for k in QUANT_OPTIONS if section.get(k) is not None}
        if quant_options and quantize is None:
            raise WorkbenchError(f"{sorted(quant_options)} need quantize: 4bit in the model section (or --quantize 4bit).")
        task = normalize_task(overrides.get("task") or raw.get("task") or spec.get("task") or "classification")
        if quantize and _is_full(method):
            raise WorkbenchError(f"run {run_name!r}: full fine-tuning cannot train a {quantize} quantized base (its weights are "
                                 f"frozen integers); drop quantize for this run or use an adapter method such as lora.")
        data = _merged(DataConfig, "data", spec.get("data"), raw.get("data"), overrides.get("data"))
        train = _merged(TrainConfig, "train", spec.get("train"), raw.get("train"), overrides.get("train"))
        if not data.dataset:
            raise WorkbenchError("no dataset given; set data.dataset in the experiment or pass --dataset PATH_OR_NAME.")
        data.dataset = _resolve_path(data.dataset, base_dir)
        runs.append(RunConfig(name=run_name, method=method, options=dict(options), model=_resolve_path(str(model), base_dir),
                              data=data, train=train, task=task, quantize=quantize, quant_options=quant_options))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkbenchError(f"run names must be unique; {dupes} appear more than once. Give each run a 'name'.")
    for run in runs:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run.name) or run.name in (".", ".."):
            raise WorkbenchError(f"run name {run.name!r} may only use letters, digits, '.', '_' and '-' (it names a folder).")
    sweeps = {}
    for raw, run in zip(runs_raw, runs):
        study_wide, own = spec.get("sweep"), raw.get("sweep")
        for where, value in (("sweep", study_wide), (f"runs[{run.name}].sweep", own)):
            if value is not None and not isinstance(value, dict):
                raise WorkbenchError(f"{where} must map train settings to lists of values, e.g. {{learning_rate: [1.0e-4, 3.0e-4]}}.")
        merged = {**(study_wide or {}), **(own or {})}
        if merged:
            sweeps[run.name] = merged
    return Experiment(name=name, output_dir=output_dir, runs=runs, seeds=spec.get("seeds"), sweeps=sweeps)


def _merged(cls: type, section: str, *layers: dict[str, Any] | None) -> Any:
    values: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise WorkbenchError(f"'{section}' must be a mapping of settings, found {layer!r}.")
        values.update({k: v for k, v in layer.items() if v is not None or k in values})
    return _build(cls, values, section)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise WorkbenchError(f"unknown {section} settings {unknown}; valid ones: {sorted(fields)}.")
    defaults = cls()
    for key, value in values.items():
        default = getattr(defaults, key)
        values[key] = _coerce(section, key, value, default)
    return cls(**values)


# Settings whose default is None, with the type a given value must have.
_OPTIONAL_TYPES = {"max_train_samples": int, "max_eval_samples": int, "save_steps": int, "head_learning_rate": float,
                   "subset": str, "prompt": str, "label_names": list,
                   "dev_split": float}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Check a setting's type against its default's (YAML reads 1e-3 as a string)."""
    if value is None:
        return None
    expected = type(default) if default is not None else _OPTIONAL_TYPES.get(key)
    try:
        if expected is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if expected is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if expected is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if expected is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if expected is list:  # label_names: a list of words
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        kind = {"list": "list of strings"}.get(expected.__name__, expected.__name__) if expected else "value"
        raise WorkbenchError(f"{section}.{key} must be a {kind}, got {value!r}.") from None
    return value


def _resolve_path(value: str, base_dir: str | os.PathLike | None) -> str:
    """A relative path that exists from the current folder or from ``base_dir``, made absolute.

    Hub names ("imdb", "user/data") that exist in neither place stay as given.
    """
    if os.path.isabs(value) or os.path.exists(value):
        return os.path.abspath(value) if os.path.exists(value) else value
    if base_dir is not None:
        candidate = os.path.join(os.fspath(base_dir), value)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return value


def _is_full(method: str) -> bool:
    """Whether ``method`` names full fine-tuning (imports the method registry, and so torch, only when asked)."""
    from peftlab.lab.methods import resolve_method

    return resolve_method(method) is None


def _slug(name: str) -> str:
    """A folder name under results/ for a study name; "." and ".." would leave results/, so they are refused."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "study"
    if slug in (".", ".."):
        raise WorkbenchError(f"study name {name!r} does not name a folder under results/; use letters or digits (--name my-study).")
    return slug


def check_output_dir(path: str) -> None:
    """Refuse an output folder that is a file or lies under one, before anything is trained."""
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe):
            if not os.path.isdir(probe):
                what = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
                raise WorkbenchError(f"output folder {path} {what}; pass --output-dir a folder path.")
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


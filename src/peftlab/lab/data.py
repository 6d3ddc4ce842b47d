"""Text-classification data: read rows, split, subsample, check labels, tokenize in batches.

Local files are read here directly (JSONL/JSON lines, CSV, Parquet via pyarrow), so the
workbench needs no extra packages offline. Hub names go through the ``datasets`` library,
imported only for them.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.errors import WorkbenchError
from peftlab.lab.experiment import DataConfig

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TOKENIZE_BATCH = 1000  # texts per tokenizer call: fast-tokenizer batching without huge lists


@dataclass
class Splits:
    """Training and evaluation rows as parallel lists, plus where the evaluation rows came from."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    eval_source: str  # e.g. "validation", "test" or "20% of train"
    num_labels: int
    # Held-out mode (data.dev_split set): the eval rows above are the dev set, used for every
    # choice (best epoch, learning rate); these test rows are only scored once, at the end.
    test_texts: list[str] | None = None
    test_labels: list[int] | None = None
    test_source: str | None = None


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read the data set described by ``cfg`` and return checked train/eval rows."""
    raw = _read_source(cfg)
    if "train" not in raw:
        raise WorkbenchError(
            f"{cfg.dataset} has no training split (found {sorted(raw)}); provide a train file or a single data file."
        )
    train = raw["train"]
    _check_columns(train, cfg, "train")
    if cfg.dev_split is not None:
        return _heldout_splits(cfg, raw, seed)
    if cfg.eval_split in raw:
        evaluation = raw[cfg.eval_split]
        _check_columns(evaluation, cfg, cfg.eval_split)
        source = cfg.eval_split
    else:
        if not 0.0 < cfg.validation_split < 1.0:
            raise WorkbenchError(
                f"{cfg.dataset} has no '{cfg.eval_split}' split and data.validation_split={cfg.validation_split} "
                f"cannot carve one out of train; use a fraction between 0 and 1 (0.2 gives a 4:1 split)."
            )
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.validation_split))
        evaluation = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
        source = f"{cfg.validation_split:.0%} of train"
    train = _subsample(train, cfg.max_train_samples, seed)
    evaluation = _subsample(evaluation, cfg.max_eval_samples, seed)
    if not train:
        raise WorkbenchError(f"{cfg.dataset}: the training split is empty; give a data set with rows.")
    if not evaluation:
        raise WorkbenchError(f"{cfg.dataset}: the evaluation split is empty; lower validation_split or add rows.")
    train_texts, train_labels = _columns(train, cfg, "train")
    eval_texts, eval_labels = _columns(evaluation, cfg, source)
    num_labels = max(train_labels + eval_labels) + 1
    return Splits(train_texts, train_labels, eval_texts, eval_labels, source, max(num_labels, 2))


def _heldout_splits(cfg: DataConfig, raw: dict[str, list[dict[str, Any]]], seed: int) -> Splits:
    """train / dev / test: dev is carved out of train (stratified by label, seeded with
    ``split_seed`` so every seed of a study sees the same dev and test rows); test is the
    ``eval_split`` split, or a stratified ``validation_split`` share of train when there is none."""
    train = raw["train"]
    if cfg.eval_split in raw:
        test = raw[cfg.eval_split]
        _check_columns(test, cfg, cfg.eval_split)
        test_source = cfg.eval_split
    else:
        if not 0.0 < cfg.validation_split < 1.0:
            raise WorkbenchError(f"{cfg.dataset} has no '{cfg.eval_split}' split to test on and data.validation_split="
                                 f"{cfg.validation_split} cannot carve one out of train; use a fraction between 0 and 1.")
        train, test = stratified_carve(train, cfg.validation_split, cfg.split_seed, cfg)
        test_source = f"{cfg.validation_split:.0%} of train (stratified)"
    n_dev = _dev_size(cfg, len(train))
    train, dev = stratified_carve(train, n_dev / len(train), cfg.split_seed + 1, cfg)
    dev_source = (f"{cfg.dev_split:.0%}" if cfg.dev_split < 1 else f"{len(dev)} rows") + " of train (stratified)"
    train = _subsample(train, cfg.max_train_samples, seed)
    dev = _subsample(dev, cfg.max_eval_samples, cfg.split_seed)
    test = _subsample(test, cfg.max_eval_samples, cfg.split_seed)
    for rows, what in ((train, "training"), (dev, "dev"), (test, "test")):
        if not rows:
            raise WorkbenchError(f"{cfg.dataset}: the {what} split is empty; lower data.dev_split / validation_split or add rows.")
    train_texts, train_labels = _columns(train, cfg, "train")
    dev_texts, dev_labels = _columns(dev, cfg, "dev")
    test_texts, test_labels = _columns(test, cfg, test_source)
    num_labels = max(2, max(train_labels + dev_labels + test_labels) + 1)
    return Splits(train_texts, train_labels, dev_texts, dev_labels, dev_source, num_labels,
                  test_texts=test_texts, test_labels=test_labels, test_source=test_source)


def _dev_size(cfg: DataConfig, n_train: int) -> int:
    """data.dev_split below 1 is a fraction of train, from 1 up a number of rows."""
    value = cfg.dev_split
    if value is None or value <= 0 or (value >= 1 and not float(value).is_integer()):
        raise WorkbenchError(f"data.dev_split must be a fraction between 0 and 1 or a whole number of rows, got {value!r}.")
    n_dev = round(n_train * value) if value < 1 else int(value)
    if not 1 <= n_dev < n_train:
        raise WorkbenchError(f"{cfg.dataset}: data.dev_split={value} leaves no training rows (train has {n_train}); lower it.")
    return n_dev


def stratified_carve(rows: list[dict[str, Any]], fraction: float, seed: int, cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, carved): ``fraction`` of the rows of each label moved out, chosen by a seeded shuffle.

    Stratifying keeps the label balance of a small dev set equal to train's, so a dev accuracy is
    not moved by an accidental class skew. Both parts keep the source's row order.
    """
    by_label: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_label.setdefault(_label(row.get(cfg.label_column), cfg, "train", index), []).append(index)
    rng = random.Random(seed)
    carved: set[int] = set()
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        carved.update(members[: round(len(members) * fraction)])
    if not carved:  # tiny sets: round() gave every class zero rows; take one row anyway
        carved.add(sorted(by_label.values(), key=len)[-1][0])
    return [r for i, r in enumerate(rows) if i not in carved], [r for i, r in enumerate(rows) if i in carved]


def _subsample(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    if limit is None or limit >= len(rows):
        return rows
    if limit <= 0:
        raise WorkbenchError(f"a sample limit must be a positive number of rows, got {limit}.")
    return random.Random(seed).sample(rows, limit)


def _check_columns(rows: list[dict[str, Any]], cfg: DataConfig, split: str) -> None:
    if not rows:
        raise WorkbenchError(f"{cfg.dataset}: the {split} split is empty; give a data set with rows.")
    columns = set(rows[0])
    for column, option in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if column not in columns:
            raise WorkbenchError(
                f"{cfg.dataset}: column {column!r} not found in the {split} split (columns: {sorted(columns)}); "
                f"set data.{option} (--{option.replace('_', '-')})."
            )


def _columns(rows: list[dict[str, Any]], cfg: DataConfig, split: str) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    for index, row in enumerate(rows):
        if cfg.text_column not in row or cfg.label_column not in row:
            raise WorkbenchError(f"{cfg.dataset}: row {index} of the {split} split lacks {cfg.text_column!r} or {cfg.label_column!r}.")
        text = row[cfg.text_column]
        if not isinstance(text, str):
            raise WorkbenchError(f"{cfg.dataset}: row {index} of the {split} split has a non-text {cfg.text_column!r}: {text!r}.")
        texts.append(text)
        labels.append(_label(row[cfg.label_column], cfg, split, index))
    return texts, labels


def _label(value: Any, cfg: DataConfig, split: str, index: int) -> int:
    """Labels are class indices; CSV gives them as digit strings, which are accepted."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / arrow scalars
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WorkbenchError(
            f"{cfg.dataset}: label {value!r} in row {index} of the {split} split is not a class index; "
            f"labels must be integers 0..K-1 (map names such as 'pos'/'neg' to numbers first)."
        )
    return value


# ----- reading sources ---------------------------------------------------------------------------
def _read_source(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    path = cfg.dataset
    if os.path.isdir(path):
        return _read_folder(path)
    if os.path.isfile(path):
        return {"train": read_file(path)}
    if path.startswith((".", "/")) or path.endswith(SUFFIXES):
        raise WorkbenchError(f"data path {path} does not exist; check the path (relative paths start from the current folder).")
    return _read_hub(cfg)


def _read_folder(folder: str) -> dict[str, list[dict[str, Any]]]:
    """Split files named train/validation/test (any supported suffix) inside ``folder``."""
    splits: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(entry)
        if suffix in SUFFIXES and stem in ("train", "validation", "valid", "dev", "test"):
            name = "validation" if stem in ("valid", "dev") else stem
            if name in splits:
                raise WorkbenchError(f"{folder} has two files for the {name} split; keep one.")
            splits[name] = read_file(os.path.join(folder, entry))
    if not splits:
        raise WorkbenchError(
            f"{folder} holds no train/validation/test files ({', '.join(SUFFIXES)}); "
            f"name them e.g. train.jsonl and validation.jsonl."
        )
    return splits


def read_file(path: str) -> list[dict[str, Any]]:
    """Rows of one JSONL / CSV / Parquet file as dicts."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkbenchError(f"{path}:{number} is not valid JSON ({exc.msg}); expected one object per line.") from None
                if not isinstance(row, dict):
                    raise WorkbenchError(f"{path}:{number} holds {type(row).__name__}, expected a JSON object per line.")
                rows.append(row)
        return rows
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise WorkbenchError(f"reading {path} needs pyarrow; pip install pyarrow, or convert the file to JSONL.") from None
        return pq.read_table(path).to_pylist()
    raise WorkbenchError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}.")


def _read_hub(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false", "False")
    try:
        import datasets
    except ImportError:
        raise WorkbenchError(
            f"{cfg.dataset!r} is not a local path, and loading hub data sets needs the datasets package: "
            f"pip install 'peftlab[hub]', or point data.dataset at local JSONL/CSV/Parquet files."
        ) from None
    try:
        loaded = datasets.load_dataset(cfg.dataset, cfg.subset)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message is what matters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (HF_HUB_OFFLINE is set, so only cached data sets load)" if offline else ""
        raise WorkbenchError(
            f"cannot load hub data set {cfg.dataset!r}{hint}: {first}. Use a local path, or go online once to cache it."
        ) from None
    return {name: [dict(row) for row in split] for name, split in loaded.items()}


# ----- tokenization -----------------------------------------------------------------------------
class Encoded(torch.utils.data.Dataset):
    """Tokenized examples (unpadded; the collator pads per batch) with their labels."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer: Any, max_length: int) -> None:
        self.features: dict[str, list[Any]] = {}
        for start in range(0, len(texts), TOKENIZE_BATCH):
            batch = tokenizer(texts[start : start + TOKENIZE_BATCH], truncation=True, max_length=max_length)
            for key, values in batch.items():
                self.features.setdefault(key, []).extend(values)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**{k: v[index] for k, v in self.features.items()}, "labels": self.labels[index]}

"""Text-classification data: read rows, split, subsample, check labels, tokenize in batches.

Local files are read here directly (JSONL/JSON lines, CSV, Parquet via pyarrow), so the
workbench needs no extra packages offline. The named sets (sst2, imdb, yelp_polarity, ag_news)
are found locally or fetched once by :mod:`peftlab.lab.named_data`; other hub names go through
the ``datasets`` library, imported only for them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import stat
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.errors import WorkbenchError
from peftlab.lab import named_data
from peftlab.lab import environ
from peftlab.lab.experiment import DataConfig

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TOKENIZE_BATCH = 1000  # texts per tokenizer call: fast-tokenizer batching without huge lists


class Row(dict):
    """One example as a dict, remembering where it came from (``file:line``) for error messages."""

    __slots__ = ("where",)

    def __init__(self, data: dict[str, Any], where: str) -> None:
        super().__init__(data)
        self.where = where


def _where(row: dict[str, Any], index: int, split: str, dataset: str) -> str:
    """``file:line`` of a row read from a file, else its position in the split."""
    return row.where if isinstance(row, Row) else f"{dataset}: row {index} of the {split} split"


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
    # Labels are checked on whole files, before any shuffle, so errors name file lines.
    num_labels = _check_classes(raw, cfg)
    if cfg.dev_split is not None:
        return _heldout_splits(cfg, raw, seed, num_labels)
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
    return Splits(train_texts, train_labels, eval_texts, eval_labels, source, max(num_labels, 2))


def _check_classes(raw: dict[str, list[dict[str, Any]]], cfg: DataConfig) -> int:
    """The number of classes: the training labels must be exactly 0..K-1 (K = len(label_names) when
    given), and evaluation labels within them. A stray label (7 in a 0/1 file) would silently train
    a head with classes that never occur, so it is an error naming its file line."""
    declared = len(cfg.label_names) if cfg.label_names else None
    train = raw["train"]
    labels = {i: _label(row[cfg.label_column], cfg, "train", i, row) for i, row in enumerate(train) if cfg.label_column in row}
    observed = sorted(set(labels.values()))
    if declared is not None:
        k = declared
    else:
        k = observed[-1] + 1 if observed else 0
        present = set(observed)
        # Classes 0..K-1 all occur exactly when there are K distinct labels (bounded work even for a label of 10**9).
        if len(present) != k:
            missing = [c for c in range(min(k, len(present) + 6)) if c not in present]
            first_missing = missing[0]
            stray = next(i for i, y in labels.items() if y > first_missing)
            shown = ", ".join(map(str, missing[:5])) + (", ..." if k - len(present) > 5 else "")
            raise WorkbenchError(
                f"{_where(train[stray], stray, 'train', cfg.dataset)}: label {labels[stray]} makes {k} classes, but classes "
                f"{shown} never occur in train; labels must be 0..K-1 with every class present. Fix or drop that row."
            )
    for split, rows in raw.items():
        for i, row in enumerate(rows):
            if cfg.label_column not in row:
                continue  # reported with the split's columns later
            y = _label(row[cfg.label_column], cfg, split, i, row)
            if y >= k:
                why = f"label_names declares {k} classes" if declared is not None else f"train has classes 0..{k - 1}"
                raise WorkbenchError(f"{_where(row, i, split, cfg.dataset)}: label {y} is outside the classes ({why}); "
                                     f"fix or drop that row.")
    return k


def _heldout_splits(cfg: DataConfig, raw: dict[str, list[dict[str, Any]]], seed: int, num_labels: int) -> Splits:
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
    return Splits(train_texts, train_labels, dev_texts, dev_labels, dev_source, max(num_labels, 2),
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
            raise WorkbenchError(f"{_where(row, index, split, cfg.dataset)} lacks {cfg.text_column!r} or {cfg.label_column!r}.")
        text = row[cfg.text_column]
        if not isinstance(text, str):
            raise WorkbenchError(f"{_where(row, index, split, cfg.dataset)} has a non-text {cfg.text_column!r}: {text!r:.80}.")
        texts.append(text)
        labels.append(_label(row[cfg.label_column], cfg, split, index, row))
    return texts, labels


def _label(value: Any, cfg: DataConfig, split: str, index: int, row: dict[str, Any] | None = None) -> int:
    """Labels are class indices; CSV gives them as digit strings, which are accepted."""
    if isinstance(value, str) and 0 < len(value.strip()) <= 18 and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / arrow scalars
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        where = _where(row, index, split, cfg.dataset) if row is not None else f"{cfg.dataset}: row {index} of the {split} split"
        raise WorkbenchError(
            f"{where}: label {value!r:.40} is not a class index; "
            f"labels must be integers 0..K-1 (map names such as 'pos'/'neg' to numbers first)."
        )
    return value


# ----- reading sources ---------------------------------------------------------------------------
def _read_source(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    path = cfg.dataset
    if os.path.isdir(path):
        return _read_folder(path)
    if os.path.exists(path):  # a file, or something that is not one: read_file says which
        return {"train": read_file(path)}
    if named_data.is_named(path) and cfg.subset is None:
        local = named_data.resolve(path)
        return _read_folder(local) if os.path.isdir(local) else {"train": read_file(local)}
    if path.startswith((".", "/")) or path.endswith(SUFFIXES):
        raise WorkbenchError(f"data path {path} does not exist; check the path (a relative path is looked up from the "
                             f"current folder, then from the folder above the experiment file's folder).")
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


def _check_regular(path: str) -> None:
    """A data file must be a plain file: reading a named pipe waits forever for a writer, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise WorkbenchError(f"cannot read data file {path}: {exc.strerror}.") from None
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "named pipe (FIFO)" if stat.S_ISFIFO(mode) else "special file"
        raise WorkbenchError(f"data file {path} is a {kind}, not a regular file; write the rows to a file and pass that.")


def read_file(path: str) -> list[dict[str, Any]]:
    """Rows of one JSONL / CSV / Parquet file as dicts."""
    suffix = os.path.splitext(path)[1].lower()
    _check_regular(path)
    if suffix in (".jsonl", ".json"):
        rows: list[dict[str, Any]] = []
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WorkbenchError(f"{path}:{number} is not UTF-8 text (byte {exc.start + 1} of the line); "
                                         f"save the file as UTF-8.") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkbenchError(f"{path}:{number} is not valid JSON ({exc.msg}); expected one object per line.") from None
                except RecursionError:
                    raise WorkbenchError(f"{path}:{number} nests JSON too deeply; expected one flat object per line.") from None
                if not isinstance(row, dict):
                    raise WorkbenchError(f"{path}:{number} holds {type(row).__name__}, expected a JSON object per line.")
                rows.append(Row(row, f"{path}:{number}"))
        return rows
    if suffix == ".csv":
        rows = []
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                # strict: a quote left open is an error, not a field that swallows the rows after it
                reader = csv.DictReader(fh, strict=True)
                start = 2  # line 1 is the header
                for row in reader:
                    if None in row or None in row.values():  # more or fewer fields than the header names
                        got = len(reader.fieldnames or []) + len(row.get(None) or []) - sum(v is None for v in row.values())
                        raise WorkbenchError(f"{path}:{start} has {got} fields but the header names {len(reader.fieldnames or [])}; "
                                             f"quote fields that hold commas (\"a, b\") and close every quote.")
                    rows.append(Row(row, f"{path}:{start}"))
                    start = reader.line_num + 1
        except UnicodeDecodeError as exc:
            raise WorkbenchError(f"{path} is not UTF-8 text (near line {len(rows) + 2}, {exc.reason}); save the file as UTF-8.") from None
        except csv.Error as exc:
            raise WorkbenchError(f"{path}:{len(rows) + 2} is not valid CSV ({exc}).") from None
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise WorkbenchError(f"reading {path} needs pyarrow; pip install pyarrow, or convert the file to JSONL.") from None
        try:
            table = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for damaged files
            raise WorkbenchError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]}).") from None
        return [Row(row, f"{path}: row {i + 1}") for i, row in enumerate(table)]
    raise WorkbenchError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}.")


def _read_hub(cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    offline = environ.offline("data")
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

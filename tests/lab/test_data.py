"""Data loading: JSONL/CSV/Parquet, splits, subsampling, label checks, batched tokenization."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from peftlab.errors import WorkbenchError
from peftlab.lab.data import Encoded, load_splits, read_file
from peftlab.lab.experiment import DataConfig
from _labutil import tiny_model_dir, toy_rows, write_jsonl  # noqa: F401 - fixture


def _csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_jsonl_folder_uses_its_validation_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(10, 0))
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(4, 1))
    s = load_splits(DataConfig(dataset=str(tmp_path)), seed=0)
    assert len(s.train_texts) == 10 and len(s.eval_texts) == 4 and s.eval_source == "validation"
    assert s.eval_texts == [r["text"] for r in toy_rows(4, 1)] and s.num_labels == 2


def test_split_ratio_carves_validation_out_of_train(tmp_path):
    rows = toy_rows(50, 0)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", toy_rows(5, 1))
    s = load_splits(DataConfig(dataset=str(tmp_path), validation_split=0.2), seed=3)
    assert (len(s.train_texts), len(s.eval_texts)) == (40, 10)  # 4:1
    assert sorted(s.train_texts + s.eval_texts) == sorted(r["text"] for r in rows)  # disjoint and complete
    again = load_splits(DataConfig(dataset=str(tmp_path), validation_split=0.2), seed=3)
    assert again.eval_texts == s.eval_texts  # seeded
    other = load_splits(DataConfig(dataset=str(tmp_path), validation_split=0.2), seed=4)
    assert other.eval_texts != s.eval_texts
    test = load_splits(DataConfig(dataset=str(tmp_path), eval_split="test"), seed=3)
    assert len(test.eval_texts) == 5 and len(test.train_texts) == 50


def test_subsampling(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(30, 0))
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(20, 1))
    s = load_splits(DataConfig(dataset=str(tmp_path), max_train_samples=7, max_eval_samples=5), seed=0)
    assert len(s.train_texts) == 7 and len(s.eval_texts) == 5
    assert set(s.train_texts) <= {r["text"] for r in toy_rows(30, 0)}


def test_csv_file_with_custom_columns(tmp_path):
    rows = [{"sentence": r["text"], "y": r["label"]} for r in toy_rows(10, 0)]
    path = _csv(tmp_path / "data.csv", rows, ("sentence", "y"))
    s = load_splits(DataConfig(dataset=str(path), text_column="sentence", label_column="y", validation_split=0.3), seed=0)
    assert len(s.train_texts) == 7 and len(s.eval_texts) == 3
    assert all(isinstance(l, int) for l in s.train_labels + s.eval_labels)  # CSV digit strings became ints


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed (Parquet support needs it)")
def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = toy_rows(10, 0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(4, 1))
    s = load_splits(DataConfig(dataset=str(tmp_path)), seed=0)
    assert len(s.train_texts) == 10 and sorted(s.train_texts) == sorted(r["text"] for r in rows)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(WorkbenchError, match="needs pyarrow"):
        read_file(str(tmp_path / "train.parquet"))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "a", "label": "pos"}], "train.jsonl:1: label 'pos' is not a class index"),
        ([{"text": "a", "label": 1.5}], "not a class index"),
        ([{"text": "a", "label": -1}], "not a class index"),
        ([{"text": "a", "label": True}], "not a class index"),
        ([{"sentence": "a", "label": 1}], "column 'text' not found .*text_column"),
        ([{"text": "a", "target": 1}], "column 'label' not found"),
        ([], "split is empty"),
    ],
)
def test_bad_rows(tmp_path, rows, message):
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(2, 0))
    with pytest.raises(WorkbenchError, match=message):
        load_splits(DataConfig(dataset=str(tmp_path)), seed=0)


def test_bad_sources(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        load_splits(DataConfig(dataset=str(tmp_path / "missing.jsonl")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no train/validation/test files"):
        load_splits(DataConfig(dataset=str(tmp_path / "empty")), seed=0)
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(WorkbenchError, match="broken.jsonl:2 is not valid JSON"):
        load_splits(DataConfig(dataset=str(tmp_path / "broken.jsonl")), seed=0)


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="(datasets package|HF_HUB_OFFLINE)"):
        load_splits(DataConfig(dataset="no-such-user/no-such-dataset"), seed=0)


def test_batched_tokenization_matches_one_call(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    import peftlab.lab.data as data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [r["text"] for r in toy_rows(9, 0)]
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 4)
    enc = Encoded(texts, [r["label"] for r in toy_rows(9, 0)], tok, max_length=5)
    whole = tok(texts, truncation=True, max_length=5)
    assert enc.features["input_ids"] == whole["input_ids"] and len(enc) == 9
    assert enc[3]["labels"] == 1 and max(len(x) for x in enc.features["input_ids"]) == 5


def test_heldout_mode_carves_a_stratified_dev_set_and_tests_on_validation(tmp_path):
    rows = toy_rows(40, 0) + [{"text": f"good extra {i}", "label": 1} for i in range(20)]  # 20 of label 0, 40 of label 1
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(12, 1))
    s = load_splits(DataConfig(dataset=str(tmp_path), dev_split=0.25), seed=0)
    # dev: 25% of each label (5 of 20, 10 of 40), so dev keeps train's 1:2 balance
    assert sorted(s.eval_labels) == [0] * 5 + [1] * 10 and len(s.train_texts) == 45
    assert sorted(s.train_texts + s.eval_texts) == sorted(r["text"] for r in rows)  # disjoint and complete
    assert s.test_texts == [r["text"] for r in toy_rows(12, 1)] and s.test_source == "validation"
    assert s.eval_source.startswith("25% of train")
    # The carving follows split_seed only: every run seed sees the same dev and test rows
    other_seed = load_splits(DataConfig(dataset=str(tmp_path), dev_split=0.25), seed=7)
    assert other_seed.eval_texts == s.eval_texts and other_seed.test_texts == s.test_texts
    reshuffled = load_splits(DataConfig(dataset=str(tmp_path), dev_split=0.25, split_seed=1), seed=0)
    assert reshuffled.eval_texts != s.eval_texts
    rows_count = load_splits(DataConfig(dataset=str(tmp_path), dev_split=6), seed=0)
    assert len(rows_count.eval_texts) == 6 and sorted(rows_count.eval_labels) == [0, 0, 1, 1, 1, 1]


def test_heldout_mode_without_an_eval_split_carves_test_from_train_too(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(50, 0))
    s = load_splits(DataConfig(dataset=str(tmp_path), dev_split=0.1, validation_split=0.2, max_eval_samples=4), seed=0)
    assert len(s.test_texts) == 4 and len(s.eval_texts) == 4 and len(s.train_texts) == 36  # 50 - 10 test - 4 dev
    assert not set(s.test_texts) & set(s.eval_texts) and not set(s.train_texts) & (set(s.test_texts) | set(s.eval_texts))
    assert s.test_source == "20% of train (stratified)"


@pytest.mark.parametrize("value, message", [(1.5, "whole number"), (0.0, "fraction between 0 and 1"),
                                            (500, "leaves no training rows")])
def test_bad_dev_split(tmp_path, value, message):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(10, 0))
    write_jsonl(tmp_path / "validation.jsonl", toy_rows(4, 1))
    with pytest.raises(WorkbenchError, match=message):
        load_splits(DataConfig(dataset=str(tmp_path), dev_split=value), seed=0)

"""Data sets by name: $PEFTLAB_DATA, then shared/data beside the checkout, then the cache, then the hub.

The local branch reads the real offline copies (skipped where they are absent); the hub branch
stubs ``datasets.load_dataset`` at its boundary, so it runs offline and without ``datasets``.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from peftlab.errors import WorkbenchError
from peftlab.lab import named_data
from peftlab.lab.data import load_splits
from peftlab.lab.experiment import DataConfig
from _labutil import ROOT, toy_rows, write_jsonl


def _real_data() -> Path | None:
    for candidate in (os.environ.get("PEFTLAB_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if candidate and (Path(candidate) / "sst2" / "validation.jsonl").is_file():
            return Path(candidate)
    return None


REAL = _real_data()
needs_real = pytest.mark.skipif(REAL is None, reason="no offline copy of the data sets (set PEFTLAB_DATA)")


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No local copy anywhere: empty $PEFTLAB_DATA and cache, no shared/ beside the checkout."""
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(named_data, "checkout_root", lambda: tmp_path / "clone")
    return tmp_path


def _fake_datasets(monkeypatch, splits: dict | None = None, error: Exception | None = None) -> list:
    """Install a stand-in ``datasets`` module; returns the list of load_dataset calls."""
    calls: list = []

    def load_dataset(path, name=None, **kwargs):  # noqa: ANN001, ANN003 - datasets' signature
        calls.append((path, name))
        if error is not None:
            raise error
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@needs_real
def test_names_read_the_real_offline_copies(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_DATA", str(REAL))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    sst2 = load_splits(DataConfig(dataset="sst2", max_train_samples=100), seed=0)
    assert (len(sst2.train_texts), len(sst2.eval_texts), sst2.eval_source, sst2.num_labels) == (100, 872, "validation", 2)
    news = load_splits(DataConfig(dataset="ag_news", eval_split="test", max_train_samples=200), seed=0)
    assert news.num_labels == 4 and len(news.eval_texts) == 7600
    yelp = load_splits(DataConfig(dataset="yelp_polarity/test.jsonl", validation_split=0.2), seed=0)  # a file of a set
    assert (len(yelp.train_texts), len(yelp.eval_texts)) == (800, 200)
    assert not (tmp_path / "cache").exists()  # a local copy is read in place, not cached
    # The Yelp copy is a 1,000-row test sample: without a train file the search goes on to the hub.
    _fake_datasets(monkeypatch, error=ConnectionError("no network"))
    with pytest.raises(WorkbenchError, match=r"yelp_polarity has no train file.*fancyzhx/yelp_polarity\): no network"):
        load_splits(DataConfig(dataset="yelp_polarity"), seed=0)


@needs_real
def test_shared_data_beside_the_checkout_is_found_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    monkeypatch.setattr(named_data, "checkout_root", lambda: REAL.parent.parent / "clone")  # REAL = <parent>/shared/data
    if REAL.name != "data" or REAL.parent.name != "shared":
        pytest.skip("the offline copy is not laid out as shared/data")
    assert named_data.resolve("imdb") == str(REAL / "imdb")


def test_peftlab_data_comes_first(nowhere, monkeypatch):
    write_jsonl(nowhere / "data" / "sst2" / "train.jsonl", toy_rows(10, 0))
    write_jsonl(nowhere / "data" / "sst2" / "validation.jsonl", toy_rows(4, 1))
    write_jsonl(nowhere / "clone" / ".." / "shared" / "data" / "sst2" / "train.jsonl", toy_rows(3, 2))
    calls = _fake_datasets(monkeypatch, error=AssertionError("the hub must not be asked"))
    s = load_splits(DataConfig(dataset="SST2"), seed=0)
    assert len(s.train_texts) == 10 and len(s.eval_texts) == 4 and not calls


def test_hub_rows_are_mapped_to_text_and_label_and_cached(nowhere, monkeypatch):
    glue = {
        "train": [{"sentence": f"train {i}", "label": i % 2, "idx": i} for i in range(6)],
        "validation": [{"sentence": f"dev {i}", "label": 1 - i % 2, "idx": i} for i in range(4)],
        "test": [{"sentence": "unlabeled", "label": -1, "idx": 0}],  # GLUE hides test labels
    }
    calls = _fake_datasets(monkeypatch, glue)
    s = load_splits(DataConfig(dataset="sst2"), seed=0)
    assert calls == [("nyu-mll/glue", "sst2")]
    assert sorted(s.train_texts) == sorted(f"train {i}" for i in range(6)) and s.eval_source == "validation"
    assert s.eval_texts == [f"dev {i}" for i in range(4)] and s.eval_labels == [1, 0, 1, 0]
    cached = nowhere / "cache" / "data" / "sst2"
    assert sorted(p.name for p in cached.iterdir()) == ["train.jsonl", "validation.jsonl"]  # no unlabeled test split

    monkeypatch.setitem(sys.modules, "datasets", None)  # the cache needs neither datasets nor the network
    again = load_splits(DataConfig(dataset="sst2"), seed=0)
    assert again.eval_texts == s.eval_texts and len(calls) == 1


def test_nothing_reachable_lists_every_place_tried(nowhere, monkeypatch):
    _fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'stanfordnlp/imdb' on the Hub (LocalEntryNotFoundError)"))
    with pytest.raises(WorkbenchError) as info:
        load_splits(DataConfig(dataset="imdb"), seed=0)
    message = str(info.value)
    for place in ("$PEFTLAB_DATA/imdb", str(nowhere / "data" / "imdb"), "shared/data/imdb", "cache",
                  "stanfordnlp/imdb", "Couldn't reach", '{"text": str, "label": int}', "peftlab[hub]"):
        assert place in message, place


def test_without_datasets_the_error_names_the_install_line(nowhere, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.delenv("PEFTLAB_DATA")
    with pytest.raises(WorkbenchError, match=r"PEFTLAB_DATA/ag_news \(not set\).*datasets package is not installed"):
        load_splits(DataConfig(dataset="ag_news"), seed=0)

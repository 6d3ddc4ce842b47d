"""Data sets by name (``dataset: sst2``): a local copy first, then the Hugging Face hub, cached.

A name is looked up, in this order, in

1. ``$PEFTLAB_DATA/<name>/`` (a folder of ``train`` / ``validation`` / ``test`` files),
2. ``shared/data/<name>/`` beside the checkout (the team machines' offline copies),
3. peftlab's cache, ``$PEFTLAB_CACHE/data/<name>/`` (what an earlier hub download left),
4. the hub, through the ``datasets`` library: rows mapped to ``text`` / ``label`` and written to
   the cache as JSONL, so the next run needs neither the network nor ``datasets``.

When none of them has the data, one error lists every place tried and how to provide it. The
repository ships no third-party data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import WorkbenchError
from peftlab.lab import environ

DATA_ENV = "PEFTLAB_DATA"
FORMAT = 'one JSON object per line, {"text": str, "label": int}, in train.jsonl / validation.jsonl / test.jsonl'


@dataclass(frozen=True)
class HubSource:
    """Where a named data set lives on the hub and which of its columns and splits are used.

    ``splits`` maps our split name to the hub's; splits without labels (GLUE's test, IMDB's
    unsupervised) are left out.
    """

    path: str
    subset: str | None
    text: str
    label: str
    splits: dict[str, str]


NAMED: dict[str, HubSource] = {
    "sst2": HubSource("nyu-mll/glue", "sst2", "sentence", "label", {"train": "train", "validation": "validation"}),
    "imdb": HubSource("stanfordnlp/imdb", None, "text", "label", {"train": "train", "test": "test"}),
    "yelp_polarity": HubSource("fancyzhx/yelp_polarity", None, "text", "label", {"train": "train", "test": "test"}),
    "ag_news": HubSource("fancyzhx/ag_news", None, "text", "label", {"train": "train", "test": "test"}),
}


def is_named(dataset: str) -> bool:
    """A named set (``sst2``) or a file inside one (``yelp_polarity/test.jsonl``)."""
    return split_name(dataset) is not None


def checkout_root() -> Path | None:
    """The repository this peftlab runs from (src/peftlab/lab/ -> repo), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    from peftlab.lab.model_zoo import cache_dir

    return Path(cache_dir()) / "data"


def local_candidates(name: str) -> list[tuple[str, Path | None]]:
    """(description, folder) in lookup order; folder None when the place is not configured."""
    name = name.lower()
    env = os.environ.get(DATA_ENV)
    root = checkout_root()
    return [
        (f"${DATA_ENV}/{name}", Path(env).expanduser() / name if env else None),
        (f"shared/data/{name} beside the checkout", root.parent / "shared" / "data" / name if root else None),
        ("peftlab's cache", cache_root() / name),
    ]


def _holds(folder: Path, needed: str) -> bool:
    """Whether ``folder`` has the file ``needed``: a relative file, or a split stem with any suffix."""
    if Path(needed).suffix:
        return (folder / needed).is_file()
    return any((folder / f"{needed}{suffix}").is_file() for suffix in (".jsonl", ".json", ".csv", ".parquet"))


def locate(name: str, needed: str = "train") -> tuple[Path | None, list[str]]:
    """The first local folder of ``name`` that holds ``needed``, and what was tried (for the error).

    A copy without a training file (the offline Yelp sample is a test split only) does not stop
    the search: a later place may have the whole set.
    """
    tried: list[str] = []
    for description, folder in local_candidates(name):
        if folder is None:
            tried.append(f"{description} (not set)")
        elif not folder.is_dir():
            tried.append(f"{description}: {folder} does not exist")
        elif not _holds(folder, needed):
            tried.append(f"{description}: {folder} has no {needed} file")
        else:
            return folder, tried
    return None, tried


def split_name(dataset: str) -> tuple[str, str] | None:
    """``"sst2"`` -> ("sst2", ""), ``"yelp_polarity/test.jsonl"`` -> ("yelp_polarity", "test.jsonl"); None if not a named set."""
    head, _, rest = dataset.replace(os.sep, "/").partition("/")
    return (head.lower(), rest) if head.lower() in NAMED else None


def resolve(dataset: str) -> str:
    """The local path for a named set: its folder (or ``name/file`` inside it) found locally, or
    the hub's rows written to the cache."""
    name, rest = split_name(dataset) or (dataset.lower(), "")
    folder, tried = locate(name, rest or "train")
    if folder is not None:
        return str(folder / rest) if rest else str(folder)
    source = NAMED[name]
    rows, problem = _from_hub(source)
    if rows is None:
        tried.append(f"the hub ({source.path}" + (f", {source.subset}" if source.subset else "") + f"): {problem}")
        raise WorkbenchError(
            f"data set {dataset!r} not found; tried " + "; ".join(tried) + ". Provide it as a folder "
            f"{name}/ under ${DATA_ENV} ({FORMAT}), or pip install 'peftlab[hub]' and run once with network access "
            f"(it is then cached)."
        )
    target = cache_root() / name
    _write_cache(target, rows)
    if rest and not (target / rest).is_file():
        raise WorkbenchError(f"data set {name!r} has no file {rest!r} (splits: {', '.join(sorted(rows))}).")
    return str(target / rest) if rest else str(target)


def _from_hub(source: HubSource) -> tuple[dict[str, list[dict[str, Any]]] | None, str]:
    """Rows per split mapped to text/label, or (None, why not)."""
    try:
        import datasets
    except ImportError:
        return None, "the datasets package is not installed (pip install 'peftlab[hub]')"
    try:
        loaded = datasets.load_dataset(source.path, source.subset)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message is what matters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, (first + (" (HF_HUB_OFFLINE is set)" if environ.offline("data") else ""))
    rows: dict[str, list[dict[str, Any]]] = {}
    for ours, theirs in source.splits.items():
        if theirs not in loaded:
            continue
        rows[ours] = [{"text": row[source.text], "label": int(row[source.label])} for row in loaded[theirs]]
    if "train" not in rows:
        return None, f"it has no {source.splits['train']!r} split (found {sorted(loaded)})"
    return rows, ""


def _write_cache(folder: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    from peftlab.io import atomic_write_text

    for split, split_rows in rows.items():
        atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows))

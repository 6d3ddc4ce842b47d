"""Seeds and sweeps: parsing, default grids from the registry, expansion into runs, the choice on dev; the cache key."""

from __future__ import annotations

import json

import pytest

from peftlab.errors import WorkbenchError
from peftlab.lab import cache, sweep
from peftlab.lab.experiment import build_experiment
from peftlab.lab.results import FAILED, OK, RunResult, save_run
from peftlab.registry import method_for


def _experiment(tmp_path, **extra):
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "train.jsonl").write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    spec = {"model": "m", "data": {"dataset": str(tmp_path / "d"), "dev_split": 0.1},
            "runs": [{"name": "full", "method": "full"}, {"name": "lora", "method": "lora", "options": {"r": 4}}], **extra}
    return build_experiment(spec)


def test_parse_seeds_and_sweep_flags():
    assert sweep.parse_seeds(3) == [0, 1, 2] and sweep.parse_seeds("3") == [0, 1, 2]
    assert sweep.parse_seeds("0,5") == [0, 5] and sweep.parse_seeds([4, 2]) == [4, 2] and sweep.parse_seeds(None) is None
    for bad in (0, "x", [1, 1], [1.5], True):
        with pytest.raises(WorkbenchError, match="seed"):
            sweep.parse_seeds(bad)
    assert sweep.parse_sweep_flags(["learning_rate=1e-4,3e-4", "weight_decay=0,0.01"]) == {
        "learning_rate": [1e-4, 3e-4], "weight_decay": [0, 0.01]}
    assert sweep.parse_sweep_flags(["learning_rate"]) == {"learning_rate": "default"}


def test_plan_expands_seeds_and_grids_with_registry_defaults(tmp_path):
    exp = _experiment(tmp_path, seeds=[0, 1], sweep={"learning_rate": "default"})
    full, lora = sweep.plan(exp)
    assert [s["learning_rate"] for s in lora.settings] == list(method_for("LORA").learning_rates)
    assert [s["learning_rate"] for s in full.settings] == [1e-5, 3e-5, 1e-4]  # full fine-tuning: the lab's grid
    runs = lora.sweep_runs()
    assert [r.name for r in runs] == ["lora.lr0.0003.s0", "lora.lr0.001.s0", "lora.lr0.003.s0"]
    assert runs[1].train.learning_rate == 1e-3 and runs[1].group == "lora" and runs[1].setting == {"learning_rate": 1e-3}
    finals = lora.final_runs({"learning_rate": 1e-3})
    assert [r.name for r in finals] == ["lora.lr0.001.s0", "lora.lr0.001.s1"] and [r.train.seed for r in finals] == [0, 1]
    assert cache.run_key(finals[0]) == cache.run_key(runs[1])  # the sweep's own run is the first seed's run
    # the command line wins over the file; a per-run sweep overrides the study-wide one
    exp = _experiment(tmp_path, sweep={"learning_rate": [1e-3]})
    exp.sweeps["lora"] = {"learning_rate": [1e-3, 1e-2], "weight_decay": [0.0, 0.1]}
    full, lora = sweep.plan(exp, seeds="2")
    assert not full.swept and full.settings == [{"learning_rate": 1e-3}] and full.seeds == [0, 1]
    assert len(lora.settings) == 4 and lora.sweep_runs()[3].name == "lora.lr0.01.wd0.1.s0"
    plain_full, _ = sweep.plan(_experiment(tmp_path))
    assert [r.name for r in plain_full.final_runs({})] == ["full"]  # a plain study keeps its run names


@pytest.mark.parametrize("sweep_spec, message", [
    ({"seed": [0, 1]}, "cannot sweep 'seed'.*seeds:"), ({"lr": [1e-3]}, "cannot sweep 'lr'"),
    ({"learning_rate": []}, "non-empty list"), ({"learning_rate": ["fast"]}, "must be a float"),
    ({"weight_decay": "default"}, "only learning_rate has a default grid")])
def test_bad_sweeps(tmp_path, sweep_spec, message):
    with pytest.raises(WorkbenchError, match=message):
        sweep.plan(_experiment(tmp_path, sweep=sweep_spec))


def test_a_sweep_needs_a_dev_split(tmp_path):
    exp = _experiment(tmp_path, sweep={"learning_rate": [1e-3, 1e-2]})
    for run in exp.runs:
        run.data.dev_split = None
    with pytest.raises(WorkbenchError, match="data.dev_split"):
        sweep.plan(exp)


def test_choose_takes_the_best_dev_accuracy_and_skips_failures(tmp_path):
    (group,) = [g for g in sweep.plan(_experiment(tmp_path, sweep={"learning_rate": [1e-4, 1e-3, 1e-2]})) if g.name == "lora"]
    names = [r.name for r in group.sweep_runs()]
    results = {names[0]: RunResult(name=names[0], method="lora", status=OK, dev_accuracy=0.7, accuracy=0.99),
               names[1]: RunResult(name=names[1], method="lora", status=OK, dev_accuracy=0.8, accuracy=0.5),
               names[2]: RunResult(name=names[2], method="lora", status=FAILED, dev_accuracy=0.9)}
    best, curve = sweep.choose(group, results)
    assert best == {"learning_rate": 1e-3}  # dev decides: the test accuracy (0.99) plays no part, a failed run none
    assert [c["dev_accuracy"] for c in curve] == [0.7, 0.8, None]
    assert sweep.choose(group, {})[0] is None


def test_cache_key_and_reuse(tmp_path):
    _, lora = sweep.plan(_experiment(tmp_path))
    run = lora.final_runs({})[0]
    key = cache.run_key(run)
    changed = lora.final_runs({})[0]
    changed.options["r"] = 8
    assert cache.run_key(changed) != key
    changed = lora.final_runs({})[0]
    changed.train.progress = False  # cosmetic: same key
    assert cache.run_key(changed) == key
    (tmp_path / "d" / "train.jsonl").write_text('{"text": "b", "label": 0}\n', encoding="utf-8")
    cache.data_fingerprint.cache_clear()
    assert cache.run_key(run) != key  # the data's content is part of the key
    key = cache.run_key(run)
    folder = tmp_path / "runs" / "lora"
    folder.mkdir(parents=True)
    assert cache.cached(str(folder), key) is None
    save_run(RunResult(name="lora", method="lora", status=OK, config_hash=key), str(folder))
    assert cache.cached(str(folder), key).status == OK and cache.cached(str(folder), "other") is None
    save_run(RunResult(name="lora", method="lora", status=FAILED, config_hash=key), str(folder))
    assert cache.cached(str(folder), key) is None  # a failed run is trained again
    (folder / "result.json").write_text("{broken", encoding="utf-8")
    assert cache.cached(str(folder), key) is None
    json.dumps(cache.code_version())


def test_a_named_set_is_fingerprinted_by_its_local_copy(tmp_path, monkeypatch):
    """``dataset: sst2`` resolves to a local folder: editing that copy must retrain, not reuse."""
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path / "data"))
    cache.data_fingerprint.cache_clear()
    before = cache.data_fingerprint("sst2")
    assert not before.startswith("name:")
    (folder / "train.jsonl").write_text('{"text": "b", "label": 0}\n', encoding="utf-8")
    cache.data_fingerprint.cache_clear()
    assert cache.data_fingerprint("sst2") != before
    cache.data_fingerprint.cache_clear()

"""A saved adapter folder is whole or absent: kills at random instants, racing writers and readers.

The fork-based tests drive :func:`peftlab.adapter_folder.save_folder` with a writer that stamps a
version number into a config, a 2 MB weights file and a sub-folder, so any mix of two versions
is visible; the forked children run plain file I/O only (no torch, so forking is safe and fast).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import LoraConfig, PeftModel, adapter_folder, get_peft_model, get_peft_model_state_dict
from conftest import tiny_bert_cls

WEIGHT_BYTES = 2 * 2**20
ROOT = Path(__file__).resolve().parents[1]


def _write_version(version: int):
    def write(root: str) -> None:
        for folder in (root, os.path.join(root, "second")):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "weights.bin"), "wb") as fh:
                fh.write(bytes([version % 256]) * WEIGHT_BYTES)
            with open(os.path.join(folder, "config.json"), "w") as fh:
                json.dump({"version": version}, fh)
    return write


def _read_versions(pin: adapter_folder.PinnedFolder) -> set[int]:
    """Every version stamp in one pinned folder (one element when the folder is whole)."""
    versions = set()
    # Open every file first (a deleted version stays readable through open descriptors), then read.
    handles = [os.fdopen(pin.open(sub + name, 2**30), "rb") for sub in ("", "second/") for name in ("config.json", "weights.bin")]
    for config, weights in zip(handles[::2], handles[1::2]):
        with config, weights:
            versions.add(json.loads(config.read())["version"] % 256)
            data = weights.read()
            assert len(data) == WEIGHT_BYTES
            versions.update(set(data))
    return versions


def _versions(folder: Path) -> set[int]:
    return adapter_folder.read_consistently(folder, _read_versions)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}{adapter_folder.STAGING_MARK}")]


def _saver(folder: Path, start: int, step: int = 1) -> int:
    """Fork a child that saves versions start, start+step, ... into ``folder`` until killed."""
    pid = os.fork()
    if pid == 0:  # child: plain file I/O only
        try:
            version = start
            while True:
                adapter_folder.save_folder(folder, _write_version(version))
                version += step
        finally:
            os._exit(0)
    return pid


def test_kill_at_random_instants_leaves_old_or_new_and_next_save_cleans_up(tmp_path):
    folder = tmp_path / "adapter"
    adapter_folder.save_folder(folder, _write_version(0))
    (folder / "tokenizer.json").write_text("{}")  # a file the saves do not write: kept
    rng = random.Random(0)
    current, changed = {0}, 0
    for kill in range(40):
        pid = _saver(folder, start=1 + 5 * kill)  # each child's versions differ from the last child's
        time.sleep(rng.uniform(0.0, 0.25))  # a save takes ~0.1 s: kills land anywhere in one
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        versions = _versions(folder)
        assert len(versions) == 1, f"a killed save left a mix of versions {versions}"
        changed += versions != current
        current = versions
        assert (folder / "tokenizer.json").read_text() == "{}"
    assert changed > 0  # kills landed after swaps too, not only before the first one
    # Killed saves leave staging folders; the next save removes them all.
    adapter_folder.save_folder(folder, _write_version(7))
    assert _leftovers(folder) == [] and _versions(folder) == {7}


def test_two_racing_writers_and_a_reader(tmp_path):
    folder = tmp_path / "adapter"
    adapter_folder.save_folder(folder, _write_version(0))
    writers = [_saver(folder, start=1, step=2), _saver(folder, start=2, step=2)]  # odd and even versions
    reads, deadline = 0, time.monotonic() + 10.0
    try:
        while reads < 30 and time.monotonic() < deadline:
            versions = _versions(folder)
            assert len(versions) == 1, f"a reader saw a mix of versions {versions}"
            reads += 1
    finally:
        for pid in writers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    final = _versions(folder)
    assert reads > 10, f"only {reads} reads in 10 s"
    assert len(final) == 1
    assert final != {0}  # the writers did swap versions in while the reader read


def test_a_live_save_is_not_cleaned_up_by_another(tmp_path):
    folder = tmp_path / "adapter"
    staging, fd = adapter_folder._new_staging(str(tmp_path), "adapter")
    try:
        assert adapter_folder.remove_leftovers(folder) == []
        assert os.path.isdir(staging)
    finally:
        os.close(fd)
    assert adapter_folder.remove_leftovers(folder) == [staging]


def test_fallback_swap_without_rename_exchange(tmp_path, monkeypatch):
    def no_exchange(a, b):
        raise adapter_folder._NoExchange

    monkeypatch.setattr(adapter_folder, "_exchange", no_exchange)
    folder = tmp_path / "adapter"
    for version in (1, 2):
        adapter_folder.save_folder(folder, _write_version(version))
        assert _versions(folder) == {version}
    assert _leftovers(folder) == []


def test_save_pretrained_swaps_whole_folder_and_keeps_other_files(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("mine")
    (tmp_path / "out" / ".adapter_model.safetensors.abc.tmp").write_bytes(b"junk of a killed pre-swap save")
    model.save_pretrained(tmp_path / "out", selected_adapters=["default"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "out")
    loaded.load_adapter(tmp_path / "out" / "second", adapter_name="second")
    for name in ("default", "second"):
        ref = get_peft_model_state_dict(model, adapter_name=name)
        got = get_peft_model_state_dict(loaded, adapter_name=name)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


_SAVE_LOOP = """
import sys, torch
from peftlab import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
cfg = BertConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(r=64, lora_alpha=8, init_lora_weights=False,
                                                                      target_modules=["query", "key", "value", "dense"]))
print("ready", flush=True)
i = 0
while True:
    i += 1
    model.peft_config["default"].lora_alpha = 8 + i  # each save pairs new weights with a new alpha
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float(i))
    model.save_pretrained(sys.argv[1])
"""


@pytest.mark.slow
def test_killed_save_pretrained_subprocess_loads_old_or_new(tmp_path):
    """Real save_pretrained, SIGKILLed at random instants: the folder loads, with weights and alpha of one save."""
    out = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(1)
    checked = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(out)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not out.exists():
            continue  # killed before the first swap: absent, never half
        config, weights = peftlab.checkpoint.load_adapter(out)
        stamp = config.lora_alpha - 8
        values = {float(t.flatten()[0]) for k, t in weights.items() if "lora_" in k}
        assert values == {float(stamp)}, f"weights of save {values} with the config of save {stamp}"
        checked += 1
    assert checked >= 2
    PeftModel.from_pretrained(copy.deepcopy(_bert_256()), out)
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter" and adapter_folder.STAGING_MARK not in p.name]


def _bert_256():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    return BertForSequenceClassification(cfg)


def test_staging_folder_taken_by_another_saves_clean_up_is_replaced(tmp_path, monkeypatch):
    """Between mkdir and flock a fresh staging folder is unlocked, so a concurrent save's clean-up may
    delete it (about 1 in 500 racing saves): the save makes another instead of raising FileNotFoundError."""
    real_open, taken = os.open, []

    def open_after_cleanup(path, flags, *args, **kwargs):
        if adapter_folder.STAGING_MARK in os.fspath(path) and flags & os.O_DIRECTORY and not taken:
            taken.append(path)
            os.rmdir(path)  # what remove_leftovers of the other save does to an unlocked staging folder
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_cleanup)
    adapter_folder.save_folder(tmp_path / "adapter", lambda staging: Path(staging, "weights.bin").write_bytes(b"new"))
    assert taken and (tmp_path / "adapter" / "weights.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_saving_into_the_current_folder_is_whole_too(tmp_path, monkeypatch):
    """It used to be written file by file (12 of 30 kills tore it): now staged and swapped like any save,
    and the process continues in the new version at the same path."""
    folder = tmp_path / "adapter"
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.chdir(folder)

    def die(staging: str) -> None:
        Path(staging, "adapter_config.json").write_text("{}")  # half a save, then a crash
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        adapter_folder.save_folder(folder, die)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "file by file" warning any more
        model.save_pretrained(".")
    assert os.getcwd() == str(folder) and Path("adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    PeftModel.from_pretrained(tiny_bert_cls(), ".")


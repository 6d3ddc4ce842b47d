"""Saving an adapter asks no network: the base's saved config is read from this machine only.

``save_pretrained`` compares the embedding size with the base model's saved config (a resized
vocabulary needs more than the adapter). That config is read from the folder the base was loaded
from or the hub cache, never downloaded: offline, a hub request is retried for many seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _no_network import fake_hub_cache, no_network_env

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys, time
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
from peftlab import LoraConfig, get_peft_model
from peftlab.errors import AdapterStateError

folder = sys.argv[1]
config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
BertForSequenceClassification(config).save_pretrained(folder + "/base")
lora = dict(r=2, target_modules=["query"], task_type="SEQ_CLS")
out = {}

# a hub id that is not cached here, on a model built in memory: nothing to compare with, saved at once
start = time.perf_counter()
model = get_peft_model(BertForSequenceClassification(config), LoraConfig(**lora, base_model_name_or_path="peftlab-test/not-cached"))
model.save_pretrained(folder + "/uncached")
out["uncached_seconds"] = time.perf_counter() - start

# the same hub id on a base loaded from a folder whose vocabulary was then resized: the folder tells
base = AutoModelForSequenceClassification.from_pretrained(folder + "/base")
base.resize_token_embeddings(120)
model = get_peft_model(base, LoraConfig(**lora, base_model_name_or_path="peftlab-test/not-cached"))
try:
    model.save_pretrained(folder + "/resized")
    out["resized"] = "saved"
except AdapterStateError as exc:
    out["resized"] = str(exc)

# a base built in memory, resized, naming a hub id that is cached here: the cached config tells
model = BertForSequenceClassification(config)
model.resize_token_embeddings(120)
model = get_peft_model(model, LoraConfig(**lora, base_model_name_or_path="peftlab-test/cached"))
try:
    model.save_pretrained(folder + "/cached")
    out["cached"] = "saved"
except AdapterStateError as exc:
    out["cached"] = str(exc)
print(json.dumps(out))
'''


def test_saving_asks_no_network_and_still_sees_a_resized_vocabulary(tmp_path):
    env, log = no_network_env(tmp_path / "net", ROOT / "src")
    (tmp_path / "hub-config").mkdir()
    (tmp_path / "hub-config" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 99}))
    fake_hub_cache(tmp_path / "hub", "peftlab-test/cached", tmp_path / "hub-config")
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert log.read_text() == ""  # not one lookup or connection: before, saving asked the hub for the base config
    assert out["uncached_seconds"] < 5  # hub retries offline take ~20 s; a save of this size takes milliseconds
    assert (tmp_path / "uncached" / "adapter_config.json").is_file()
    assert "vocabulary was resized" in out["resized"] and not (tmp_path / "resized").exists()
    assert "vocabulary was resized" in out["cached"] and not (tmp_path / "cached").exists()
    assert time.perf_counter() - start < 120

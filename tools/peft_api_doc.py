"""Write docs/peft_api.md: every public name of peft and of its PeftModel / LoraModel / LoRA layer, and peftlab's answer.

Reads the installed peft (the oracle, 0.22 or newer), builds one tiny Llama with a LoRA adapter in
both libraries, and lists each name as present in peftlab, or refused with the sentence peftlab
gives (peftlab.unsupported). A name with neither makes the tool fail: new peft names must be
decided, not silently missed.

    python tools/peft_api_doc.py          # rewrite docs/peft_api.md
    python tools/peft_api_doc.py --check  # exit 1 if the file is stale (the test suite runs this)
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "peft_api.md"


def _objects(lib):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    return {"PeftModel": model, "LoraModel": model.base_model, "LoraLayer": model.base_model.model.model.layers[0].self_attn.q_proj}


def render() -> str:
    warnings.simplefilter("ignore")
    import peft
    import torch

    import peftlab
    from peftlab.unsupported import MISSING_ATTRIBUTES, refusal

    lines = [
        "# peft's API in peftlab",
        "",
        f"Written by `tools/peft_api_doc.py` from peft {peft.__version__} (the oracle) and this checkout; "
        "`tests/test_peft_surface.py` fails when it is stale. ✅ = the same name works in peftlab "
        "(behaviour compared with peft in the test suite where it matters); otherwise the sentence peftlab "
        "answers with (`from peftlab import X` raises it as an ImportError, `peftlab.X` as an AttributeError).",
        "",
        f"## Top-level names (`peft.__all__`, {len(peft.__all__)} names)",
        "",
        "| name | peftlab |",
        "|---|---|",
    ]
    missing: list[str] = []
    present = 0
    for name in sorted(peft.__all__, key=str.lower):
        if hasattr(peftlab, name):
            present += 1
            lines.append(f"| `{name}` | ✅ |")
        elif (why := refusal(name)) is not None:
            lines.append(f"| `{name}` | {why} |")
        else:
            missing.append(name)
    lines[lines.index(f"## Top-level names (`peft.__all__`, {len(peft.__all__)} names)")] += f": {present} present"
    ours, theirs = _objects(peftlab), _objects(peft)
    module_names = set(dir(torch.nn.Module()))
    for kind, obj in theirs.items():
        names = sorted(n for n in dir(obj) if not n.startswith("_") and n not in module_names)
        have = [n for n in names if hasattr(ours[kind], n)]
        lines += ["", f"## `{kind}` attributes ({len(names)} public names beyond nn.Module's: {len(have)} present)", "",
                  "| name | peftlab |", "|---|---|"]
        for name in names:
            if name in have:
                lines.append(f"| `{name}` | ✅ |")
            elif name in MISSING_ATTRIBUTES[kind]:
                lines.append(f"| `{name}` | not present: {MISSING_ATTRIBUTES[kind][name]} |")
            else:
                missing.append(f"{kind}.{name}")
    if missing:
        raise SystemExit(f"peft names with no decision (add them to peftlab.unsupported): {missing}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when docs/peft_api.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale: run python tools/peft_api_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Adapter save and load time: peftlab vs Hugging Face peft (LoRA r=8 all-linear, and IA3).

Save: ``save_pretrained`` of the adapter (config + safetensors) into a fresh folder.
Load: ``load_adapter`` of that folder into an existing model under a new name (the adapter is
deleted again, untimed). Both libraries alternate, after warm-up, 2 threads.

    PYTHONPATH=src python benchmarks/bench_save_load.py --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import _common as C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import peft
    import peftlab

    base = C.minilm_classifier()
    configs = {
        "lora_all": lambda lib: (peft if lib == "peft" else peftlab).LoraConfig(task_type="SEQ_CLS", r=8, target_modules="all-linear"),
        "ia3": lambda lib: (peft if lib == "peft" else peftlab).IA3Config(task_type="SEQ_CLS"),
    }
    table, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for cname, make in configs.items():
            models = {lib: C.get_peft_model(lib, copy.deepcopy(base), make(lib)) for lib in ("peftlab", "peft")}
            times: dict[str, list[float]] = {f"{op}/{lib}": [] for op in ("save", "load") for lib in models}
            for r in range(args.rounds + 2):
                for lib in (list(models) if r % 2 else list(reversed(list(models)))):
                    model = models[lib]
                    path = f"{tmp}/{cname}-{lib}-{r}"
                    start = time.perf_counter()
                    model.save_pretrained(path)
                    saved = time.perf_counter()
                    model.load_adapter(path, adapter_name="loaded")
                    loaded = time.perf_counter()
                    model.delete_adapter("loaded")
                    if r >= 2:  # warm-up rounds are not recorded
                        times[f"save/{lib}"].append(saved - start)
                        times[f"load/{lib}"].append(loaded - saved)
            for op in ("save", "load"):
                ours, theirs = times[f"{op}/peftlab"], times[f"{op}/peft"]
                ratio = statistics.median(a / b for a, b in zip(ours, theirs))
                table[f"{cname}/{op}"] = {"peftlab_ms": C.median(ours) * 1000, "peft_ms": C.median(theirs) * 1000,
                                          "time_vs_peft": ratio, "peftlab_s": ours, "peft_s": theirs}
                rows.append([f"{cname} {op}", f"{C.median(ours) * 1000:.1f}", f"{C.median(theirs) * 1000:.1f}", f"{ratio:.2f}"])
    C.print_table(["operation", "peftlab ms", "peft ms", "time x peft"], rows)
    C.write_results("save_load", {"rounds": args.rounds, "results": table})


if __name__ == "__main__":
    main()

"""Memory of loading SmolLM2-135M with a 4-bit NF4 base: peak and resident size after the load.

Each variant loads in a fresh process (so its peak is its own), ``--repeats`` times, alternating:
  * ``trim``: ``load_quantized_model`` as shipped (freed heap pages handed back after every layer),
  * ``no_trim``: the same with ``peftlab.release_memory.trim_heap`` turned into a no-op,
  * ``fp32``: the plain full-precision model with every weight read once, for scale (its weights
    are pages of the memory-mapped file, resident only once read).
Reported from /proc/self/status: VmHWM (peak resident), VmRSS, RssAnon and RssFile after loading,
minus the same process's figures before the load (imports included in neither).

    python benchmarks/qlora_load_memory.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import _common as C

CHILD = r"""
import json, re, sys
def status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
import peftlab.quantization as Q
from peftlab.lab.model_zoo import smollm2_135m
path = smollm2_135m()
variant = sys.argv[1]
before = status()
if variant == "fp32":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    sum(float(p.sum()) for p in model.parameters())  # read every weight once, as the 4-bit load does
else:
    if variant == "no_trim":
        Q.trim_heap = lambda: False
    model = Q.load_quantized_model(path)
after = status()
print(json.dumps({"before": before, "after": after}))
"""

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = ["trim", "no_trim", "fp32"]
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
            samples[variant].append(json.loads(line))
            print(f"round {i + 1}/{args.repeats}: {variant} done", flush=True)
    table, rows = {}, []
    for variant in variants:
        # VmHWM is the process's peak since it started, so the load's own peak is VmHWM minus RSS before it.
        med = {f: statistics.median(s["after"][f] - (s["before"]["VmRSS"] if f == "VmHWM" else s["before"][f]) for s in samples[variant])
               for f in FIELDS}
        table[variant] = med
        rows.append([variant, *(f"{med[f]:.0f}" for f in FIELDS)])
    C.print_table(["variant", "load peak MiB", "RSS after MiB", "anon after MiB", "file after MiB"], rows)
    C.write_results("qlora_load_memory", {"repeats": args.repeats, "median_mib_added_by_load": table, "samples": samples})


if __name__ == "__main__":
    main()

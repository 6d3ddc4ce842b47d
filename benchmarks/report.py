"""Print the Markdown tables of docs/benchmarks.md from benchmarks/results/*.json (no re-running).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_line(data: dict) -> str:
    start = ", ".join(f"{x:.1f}" for x in data["environment"]["loadavg_start"])
    end = ", ".join(f"{x:.1f}" for x in data["loadavg_end"])
    return f"load average (1, 5, 15 min) at start: {start}; at end: {end}; rounds: {data.get('rounds')}"


def training() -> None:
    for path in sorted(RESULTS.glob("train_seq*.json")):
        data = json.loads(path.read_text())
        res = data["results"]
        precision = ", bf16 autocast (every variant)" if data.get("autocast") else ""
        print(f"\n#### Training step, seq {data['seq']}, batch {data['batch']}{precision} ({path.name})\n")
        print(load_line(data) + "\n")
        print("| configuration | peftlab x full FT | peft x full FT | peftlab time x peft | peftlab saved+grads MB | peft saved+grads MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("full_ft", "frozen_floor", "full_ft_fp32"):
            if name in res:
                mem = res[name].get("memory_mb") or {}
                print(f"| {name} | {res[name]['vs_full_ft']:.2f} | | | {mem.get('total_mb', float('nan')):.0f} | |")
        configs = list(dict.fromkeys(k.split("/")[0] for k in res if "/" in k))
        for cfg in configs:
            ours, theirs = res.get(f"{cfg}/peftlab"), res.get(f"{cfg}/peft")
            if not ours or not theirs:
                continue
            om, tm = ours.get("memory_mb") or {}, theirs.get("memory_mb") or {}
            print(f"| {cfg} | {ours['vs_full_ft']:.2f} | {theirs['vs_full_ft']:.2f} | {ours['vs_peft']:.2f} | "
                  f"{om.get('total_mb', float('nan')):.0f} | {tm.get('total_mb', float('nan')):.0f} |")


def inference() -> None:
    data = load("inference_seq64")
    if data is None:
        return
    print(f"\n#### Inference, one adapter, batch {data['batch']}, seq {data['seq']}\n")
    print(load_line(data) + "\n")
    print("| variant | ms | time x bare base | time x peft | max abs diff vs peft |")
    print("|---|---:|---:|---:|---:|")
    for name, r in data["results"].items():
        diff = r.get("max_abs_diff_vs_peft_unmerged")
        print(f"| {name} | {r['median_s'] * 1000:.0f} | {r['time_vs_base']:.3f} | "
              f"{r.get('time_vs_peft', float('nan')):.3f} | {'' if diff is None else f'{diff:.1e}'} |")


def mixed() -> None:
    for path in sorted(RESULTS.glob("mixed_batch_seq*.json"), key=lambda p: int(p.stem.split("seq")[1])):
        mixed_table(json.loads(path.read_text()))


def mixed_table(data: dict) -> None:
    print(f"\n#### Mixed batch, {len(data['adapters'])} adapters, batch {data['batch']}, seq {data['seq']}\n")
    print(load_line(data) + f"; max abs diff of logits vs peft: {data['max_abs_diff']:.1e}\n")
    print("| variant | ms | rows/s | time x bare base | throughput x peft |")
    print("|---|---:|---:|---:|---:|")
    for name, r in data["results"].items():
        tp = r.get("throughput_vs_peft")
        print(f"| {name} | {r['median_s'] * 1000:.0f} | {r['rows_per_s']:.1f} | {r['time_vs_base']:.2f} | {'' if tp is None else f'{tp:.2f}'} |")


def save_load() -> None:
    data = load("save_load")
    if data is None:
        return
    print("\n#### Adapter save / load\n")
    print(load_line(data) + "\n")
    print("| operation | peftlab ms | peft ms | time x peft |")
    print("|---|---:|---:|---:|")
    for name, r in data["results"].items():
        print(f"| {name} | {r['peftlab_ms']:.1f} | {r['peft_ms']:.1f} | {r['time_vs_peft']:.2f} |")


if __name__ == "__main__":
    training()
    inference()
    mixed()
    save_load()

"""Summarise one tools/gpu_check.sh run: the CUDA tests' counts and the GPU benchmark beside peft.

    python tools/gpu_summary.py results/gpu

Reads ``tests.xml`` (pytest's JUnit report) and the ``causal_*.json`` files bench_causal.py wrote
there; writes ``summary.json`` and ``summary.md`` next to them and prints the latter. Exit status 1
when a test failed, no test ran, or a benchmark file is missing or empty.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def tests_summary(path: Path) -> dict:
    if not path.exists():
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"ran": True, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "seconds": sum(float(s.get("time", 0)) for s in suites)}


def _fmt(value, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--expect", type=int, default=0, help="how many benchmark files the run should have written")
    args = parser.parse_args()
    out = Path(args.directory)
    tests = tests_summary(out / "tests.xml")
    benches = sorted((json.loads(p.read_text()) for p in out.glob("causal_*.json")), key=lambda b: (b["precision"], b["seq"]))
    lines = ["# GPU check", ""]
    gpu = benches[0]["gpu"]["name"] if benches else "(no benchmark)"
    lines.append(f"Card: **{gpu}**. Tests: " + (
        f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped in {tests['seconds']:.0f} s"
        if tests["ran"] else "not run") + ".")
    for name in tests.get("failed", []):
        lines.append(f"- failed: `{name}`")
    lines += ["", "| seq | precision | batch | variant | ms/step | tokens/s | step x peft | step peak MB | peak x peft |",
              "|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for bench in benches:
        for variant, row in bench["results"].items():
            mem = row.get("memory_mb") or {}
            lines.append(f"| {bench['seq']} | {bench['precision']} | {bench['batch']} | {variant} | {_fmt(row.get('median_s') and row['median_s'] * 1000, '.1f')} | "
                         f"{_fmt(row.get('tokens_per_s'), '.0f')} | {_fmt(row.get('vs_peft'))} | {_fmt(mem.get('peak_step_mb'), '.0f')} | "
                         f"{_fmt(row.get('peak_step_memory_vs_peft'))} |")
        check = bench.get("target_check", {})
        if check.get("applies"):
            checks.append(check)
    targets = benches[0]["targets"] if benches else {}
    if targets:
        lines += ["", f"Targets at seq {targets['seq']} {targets['autocast']}: LoRA step <= {targets['step_vs_peft_at_most']}x peft, "
                      f"step peak memory <= {targets['peak_step_memory_vs_peft_at_most']}x peft."]
        for check in checks:
            lines.append(f"- step {_fmt(check.get('step_vs_peft'))}x ({'met' if check.get('step_ok') else 'not met'}), "
                         f"peak memory {_fmt(check.get('peak_step_memory_vs_peft'))}x ({'met' if check.get('memory_ok') else 'not met'})")
        if not checks:
            lines.append("- no run at the target configuration (a dry run or --quick without it)")
    text = "\n".join(lines) + "\n"
    summary = {"gpu": gpu, "tests": tests, "benchmarks": [p.name for p in sorted(out.glob("causal_*.json"))], "target_checks": checks}
    for name, content in (("summary.json", json.dumps(summary, indent=2)), ("summary.md", text)):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out / name)
    print(text)
    bad = not tests["ran"] or tests["tests"] == 0 or tests["failures"] or tests["errors"] or len(benches) < args.expect
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

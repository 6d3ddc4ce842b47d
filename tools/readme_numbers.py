"""Write README.md's measured numbers from results files, so that the README cannot drift from them.

Each marked README section ``<!-- numbers:NAME -->...<!-- /numbers:NAME -->`` is rendered from
results files kept in benchmarks/results/ (the acceptance study's; the causal-LM benchmark runs
named in ``CAUSAL_ROWS``). After re-running a study, copy its results in and regenerate:

    python -m peftlab compare examples/minilm_sst2_compare.yaml --cpu
    python tools/readme_numbers.py --from results/minilm-sst2-compare/results.json

``--check`` only compares (exit status 1 and the differing section when the README is stale);
the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ACCEPTANCE = ROOT / "benchmarks" / "results" / "acceptance_minilm_sst2.json"
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "ia3": "IA3"}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def acceptance(results: dict) -> str:
    """The acceptance study's sentence: accuracy per method (over seeds: mean ± std and the paired
    comparison's verdict), time, machine and commit."""
    runs = {r["name"]: r for r in results["runs"]}
    bad = [name for name, r in runs.items() if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"error: runs {bad} did not finish (status != ok); the README quotes finished studies only.")
    env = next(r["environment"] for r in runs.values() if r.get("environment"))
    seconds = sum(r["total_seconds"] for r in runs.values())
    commit = (env.get("git_commit") or "unknown")[:7]
    machine = (f"{_duration(seconds)} for the {_count(len(runs))} runs on {env['cpu_count']} CPU cores, commit {commit}, "
               f"torch {env['versions']['torch']}; [results]({ACCEPTANCE.relative_to(ROOT).as_posix()})")
    groups = results.get("groups") or {}
    if not any(len(members) > 1 for members in groups.values()):
        accuracies = ", ".join(f"{LABELS.get(name, name)} {100 * r['accuracy']:.1f}%" for name, r in runs.items())
        return f"{accuracies} on the 872 SST-2 validation sentences; {machine}"
    import statistics

    parts = []
    for group, members in groups.items():
        values = [100 * runs[n]["accuracy"] for n in members]
        parts.append(f"{LABELS.get(group, group)} {statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}%")
    seeds = len(next(iter(groups.values())))
    dev = next((r.get("eval_source") for r in runs.values() if r.get("test_source")), None)
    return (f"{', '.join(parts)} (mean ± std over {seeds} seeds; {_verdict(results)}) on the 872 SST-2 validation "
            f"sentences" + (f", every choice made on a dev set ({dev})" if dev else "") + f"; {machine}")


def _count(n: int) -> str:
    return {3: "three", 6: "six", 9: "nine"}.get(n, str(n))


def _verdict(results: dict) -> str:
    """What the report's paired comparison says about the methods, in a few words."""
    from peftlab.lab.results import RunResult
    from peftlab.lab.summary import best_group, summarize

    runs = [RunResult.from_dict(r) for r in results["runs"]]
    groups = summarize(runs, results)
    best = best_group(groups)
    worse = [LABELS.get(g.name, g.name) for g in groups if g.vs_best is not None and g.vs_best.marked]
    if worse:
        return f"{', '.join(worse)} worse than {LABELS.get(best.name, best.name)} in the paired comparison"
    return "the paired comparison shows no method apart from the best"


RESULTS = ROOT / "benchmarks" / "results"
# The causal-LM table: (question, results file, variant, peer variant or None, what to show).
CAUSAL_ROWS = [
    ("step time, seq 256, fp32, x peft", "causal_seq256_b4_stash-gc10.json", "lora/peftlab", "lora/peft", "step"),
    ("step time, seq 512, fp32, x peft", "causal_seq512_b4_avx512-timed.json", "lora/peftlab", "lora/peft", "step"),
    ("step time, seq 256, bf16 autocast, x peft", "causal_seq256_b4_bf16_bf16-avx512.json", "lora/peftlab", "lora/peft", "step"),
    ("step time, seq 512, bf16 autocast, x peft", "causal_seq512_b4_bf16_bf16-gc-avx512.json", "lora/peftlab", "lora/peft",
     "step"),
    ("step time on a 4-bit NF4 base, seq 256, fp32, x peft + bitsandbytes", "causal_seq256_b4_avx512-nf4.json",
     "lora_nf4/peftlab", "lora_nf4/peft", "step"),
    ("gradient checkpointing: step time x the same library without it, seq 256, fp32", "causal_seq256_b4_stash-gc10.json",
     "lora_gc/peftlab", "lora_gc/peft", "no_gc"),
    ("the same, seq 512, bf16 autocast", "causal_seq512_b4_bf16_bf16-gc-avx512.json", "lora_gc/peftlab", "lora_gc/peft",
     "no_gc"),
    ("the same, again (10 rounds, peftlab only)", "causal_seq512_b4_bf16_bf16-gc10-avx512.json", "lora_gc/peftlab", None,
     "no_gc"),
    ("peak RSS rise of a step, seq 512, x peft", "causal_seq512_b4_memory_stash.json", "lora/peftlab", "lora/peft", "rss"),
    ("the same on a 4-bit NF4 base", "causal_seq512_b4_memory_kept-positions.json", "lora_nf4/peftlab", "lora_nf4/peft",
     "rss"),
    ("activations held after forward, seq 512: no checkpointing / checkpointing", "causal_seq512_b4_memory_stash.json",
     "lora/peftlab", "lora_gc/peftlab", "forward_held_mb"),
    ("peak RSS rise of a step, seq 512: no checkpointing / checkpointing", "causal_seq512_b4_memory_stash.json",
     "lora/peftlab", "lora_gc/peftlab", "peak_rss_rise_mb"),
]


CAUSAL_FILES = sorted({row[1] for row in CAUSAL_ROWS})  # each read once, in this order


def _causal_cell(results: dict, variant: str, peer: str | None, kind: str) -> tuple[str, str]:
    rows = results["results"]
    mine = rows[variant]
    if kind == "step":
        return (f"{mine['median_s']:.2f} s, {mine['tokens_per_s']:.0f} tokens/s (**{mine['vs_peft']:.2f}x**)",
                f"{rows[peer]['median_s']:.2f} s, {rows[peer]['tokens_per_s']:.0f} tokens/s")
    if kind == "no_gc":
        return f"**{mine['vs_no_gc']:.2f}x**", f"{rows[peer]['vs_no_gc']:.2f}x" if peer else ""
    if kind == "rss":
        ours, theirs = mine["memory_mb"]["peak_rss_rise_mb"], rows[peer]["memory_mb"]["peak_rss_rise_mb"]
        return f"{ours:,.0f} MB (**{ours / theirs:.2f}x**)", f"{theirs:,.0f} MB"
    plain, checkpointed = mine["memory_mb"][kind], rows[peer]["memory_mb"][kind]  # one library, two settings
    return f"{plain:,.0f} / {checkpointed:,.0f} MB (**{plain / checkpointed:.1f}x less**)", ""


def causal(*files: dict) -> str:
    """The causal-LM performance table: one row per question, each from its results file (``files``
    are the contents of ``CAUSAL_FILES``, in that order)."""
    by_name = dict(zip(CAUSAL_FILES, files))
    lines = ["| question | peftlab | peft | results file (machine, commit) |", "|---|---:|---:|---|"]
    for question, name, variant, peer, kind in CAUSAL_ROWS:
        results = by_name[name]
        env = results["environment"]
        ours, theirs = _causal_cell(results, variant, peer, kind)
        cpu = f"{env['cpu_model']} {env.get('cpu_capability', '')}, " if env.get("cpu_model") else ""
        lines.append(f"| {question} | {ours} | {theirs} | [{name}](benchmarks/results/{name}) ({cpu}"
                     f"{env['finished_utc'][:10]}, {env.get('git_commit') or 'unknown'}) |")
    return "\n" + "\n".join(lines) + "\n"


SECTIONS: dict[str, tuple[tuple[Path, ...], Callable[..., str]]] = {
    "acceptance": ((ACCEPTANCE,), acceptance),
    "causal": (tuple(RESULTS / name for name in CAUSAL_FILES), causal),
}


def missing_results() -> list[Path]:
    """Results files the README's sections need that are not in the repository yet."""
    return [path for paths, _ in SECTIONS.values() for path in paths if not path.is_file()]


def render(readme: str) -> str:
    """``readme`` with every marked section rewritten from its results file."""
    for name, (paths, renderer) in SECTIONS.items():
        pattern = re.compile(rf"(<!-- numbers:{name} -->)(.*?)(<!-- /numbers:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"error: README.md has no <!-- numbers:{name} --> ... <!-- /numbers:{name} --> section.")
        for path in paths:
            if not path.is_file():
                raise SystemExit(f"error: {path.relative_to(ROOT)} does not exist; run the study or benchmark "
                                 f"that writes it (see README), then python tools/readme_numbers.py.")
        text = renderer(*(json.loads(path.read_text(encoding="utf-8")) for path in paths))
        readme = pattern.sub(lambda m, text=text: m.group(1) + text + m.group(3), readme)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path,
                        help=f"a fresh results.json of the acceptance study, copied to {ACCEPTANCE.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    if args.source is not None:
        if args.check:
            parser.error("--from writes; use it without --check")
        shutil.copyfile(args.source, ACCEPTANCE)
        print(f"copied {args.source} -> {ACCEPTANCE.relative_to(ROOT)}")
    current = README.read_text(encoding="utf-8")
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md is out of date with its results files; run: python tools/readme_numbers.py", file=sys.stderr)
            return 1
        print("README.md numbers match their results files")
        return 0
    if updated != current:
        README.write_text(updated, encoding="utf-8")
        print("README.md updated")
    else:
        print("README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

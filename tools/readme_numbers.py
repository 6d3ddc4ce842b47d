"""Write README.md's measured numbers from results files, so that the README cannot drift from them.

Each marked README section ``<!-- numbers:NAME -->...<!-- /numbers:NAME -->`` is rendered from one
results file kept in benchmarks/results/. After re-running a study, copy its results in and
regenerate:

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
    """The acceptance study's sentence: accuracy per method, time, machine and commit."""
    runs = {r["name"]: r for r in results["runs"]}
    bad = [name for name, r in runs.items() if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"error: runs {bad} did not finish (status != ok); the README quotes finished studies only.")
    accuracies = ", ".join(f"{LABELS.get(name, name)} {100 * r['accuracy']:.1f}%" for name, r in runs.items())
    env = next(r["environment"] for r in runs.values() if r.get("environment"))
    seconds = sum(r["total_seconds"] for r in runs.values())
    commit = (env.get("git_commit") or "unknown")[:7]
    return (f"{accuracies} on the 872 SST-2 validation sentences; {_duration(seconds)} for the three runs on "
            f"{env['cpu_count']} CPU cores, commit {commit}, torch {env['versions']['torch']}; "
            f"[results]({ACCEPTANCE.relative_to(ROOT).as_posix()})")


SECTIONS: dict[str, tuple[Path, Callable[[dict], str]]] = {"acceptance": (ACCEPTANCE, acceptance)}


def missing_results() -> list[Path]:
    """Results files the README's sections need that are not in the repository yet."""
    return [path for path, _ in SECTIONS.values() if not path.is_file()]


def render(readme: str) -> str:
    """``readme`` with every marked section rewritten from its results file."""
    for name, (path, renderer) in SECTIONS.items():
        pattern = re.compile(rf"(<!-- numbers:{name} -->)(.*?)(<!-- /numbers:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"error: README.md has no <!-- numbers:{name} --> ... <!-- /numbers:{name} --> section.")
        if not path.is_file():
            raise SystemExit(f"error: {path.relative_to(ROOT)} does not exist; run the study, then "
                             f"python tools/readme_numbers.py --from RESULTS_JSON.")
        text = renderer(json.loads(path.read_text(encoding="utf-8")))
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

"""benchmarks/results/ holds what README.md and docs/ cite, and every cited results file exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Where results are cited: the README, the docs, and the tools that render README numbers from them.
CITING = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tools").glob("*.py"))]
# Names of results files the benchmark scripts write (a cited name of this form must exist).
RESULT_NAME = re.compile(
    r"(?<![\w/.-])(?:benchmarks/)?(?:results/)?((?:acceptance|causal|head_blocks|inference|kernel_ab|mixed_batch|qlora|save_load"
    r"|skinny_matmul|study|train_seq|workbench_oracle)[A-Za-z0-9_.-]*\.json)"
)


def _texts() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in CITING}


def test_every_results_file_is_cited():
    texts = "\n".join(_texts().values())
    uncited = sorted(p.name for p in RESULTS.glob("*.json") if p.name not in texts)
    assert uncited == [], f"cite these in README.md or docs/ (with the command that made them), or delete them: {uncited}"


def test_every_cited_results_file_exists():
    missing = sorted({f"{path.relative_to(ROOT)}: {name}" for path, text in _texts().items()
                      for name in RESULT_NAME.findall(text) if not (RESULTS / name).exists()})
    assert missing == []

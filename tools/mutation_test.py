"""Mutation testing of peftlab's core modules with mutmut (not part of CI: minutes per module).

Each module is mutated on its own, in a scratch copy of the project (``src/``, ``tests/``,
``pyproject.toml`` with a ``[tool.mutmut]`` section written for that module), and only the tests
that exercise it run against its mutants. mutmut 3 forks a warmed-up pytest per mutant and runs only
the tests that reached the mutated function, so a module takes minutes on two cores, not hours.

    pip install "peftlab[mutation]"                       # mutmut
    python tools/mutation_test.py functional lora         # some modules
    python tools/mutation_test.py --all --jobs 2          # every module in MODULES

Prints, per module, killed / total and every surviving mutant (``mutmut show <name>`` in the
scratch folder prints its diff), and writes ``<scratch>/summary.json``. docs/testing.md records
the last measured run and why each survivor is harmless or which test now kills it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (file under src/peftlab, the tests that exercise it). The peft-parity tests stay in
# where they sit in these files: they are a second witness, not the only one.
MODULES: dict[str, tuple[str, list[str]]] = {
    "functional": ("functional.py", ["tests/test_functional.py", "tests/test_references.py", "tests/methods/test_lora.py", "tests/methods/test_dora.py",
                                     "tests/methods/test_loha.py", "tests/methods/test_lokr.py", "tests/methods/test_adalora.py",
                                     "tests/methods/test_lora_config.py"]),
    "lora": ("methods/lora/lora.py", ["tests/methods/test_lora.py", "tests/methods/test_lora_config.py", "tests/test_references.py",
                                      "tests/test_errors.py", "tests/methods/test_dora.py", "tests/test_quantization.py"]),
    "lora_layers": ("methods/lora/layers.py", ["tests/methods/test_lora.py", "tests/methods/test_lora_config.py", "tests/test_references.py",
                                               "tests/test_kernels.py", "tests/test_quantization.py"]),
    "dora": ("methods/lora/dora.py", ["tests/methods/test_dora.py"]),
    "ia3": ("methods/ia3/ia3.py", ["tests/methods/test_ia3.py", "tests/test_targeting.py", "tests/test_checkpoint.py"]),
    "kernels": ("kernels.py", ["tests/test_kernels.py", "tests/test_activation_checkpointing.py", "tests/test_mixed_batch.py"]),
    "checkpoint": ("checkpoint.py", ["tests/test_checkpoint.py", "tests/test_errors.py", "tests/test_io.py",
                                     "tests/test_adapter_folder.py", "tests/test_peft_api.py", "tests/methods/test_adalora.py",
                                     "tests/methods/test_prompt_tuning.py"]),
    "mixed_batch": ("mixed_batch.py", ["tests/test_mixed_batch.py", "tests/test_peft_api.py"]),
}


def mutmut_section(source: str, tests: list[str]) -> str:
    lines = [
        "[tool.mutmut]",
        'source_paths = ["src"]',
        f'only_mutate = ["src/peftlab/{source}"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow"]',
    ]
    return "\n".join(lines) + "\n"


def prepare(name: str, scratch: Path) -> Path:
    source, tests = MODULES[name]
    folder = scratch / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", text)  # ours replaces any section there
    (folder / "pyproject.toml").write_text(text + "\n" + mutmut_section(source, tests))
    return folder


def results(folder: Path, mutmut: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=folder, env=env, capture_output=True, text=True)
    status: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if ":" in line and "__mutmut_" in line:
            key, _, value = line.strip().rpartition(":")
            status[key.strip()] = value.strip()
    return status


def run_module(name: str, scratch: Path, jobs: int, mutmut: str) -> dict:
    folder = prepare(name, scratch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    start = time.time()
    proc = subprocess.run([mutmut, "run", "--max-children", str(jobs)], cwd=folder, env=env, capture_output=True, text=True)
    elapsed = time.time() - start
    status = results(folder, mutmut, env)
    counts: dict[str, int] = {}
    for value in status.values():
        counts[value] = counts.get(value, 0) + 1
    # "no tests" (no selected test reaches the function) counts against the score, like a survivor.
    decided = sum(counts.get(k, 0) for k in ("killed", "survived", "timeout", "no tests", "suspicious"))
    summary = {
        "module": MODULES[name][0],
        "tests": MODULES[name][1],
        "seconds": round(elapsed),
        "counts": counts,
        "killed_share": round((counts.get("killed", 0) + counts.get("timeout", 0)) / decided, 3) if decided else None,
        "survived": sorted(k for k, v in status.items() if v == "survived"),
        "no_tests": sorted(k for k, v in status.items() if v == "no tests"),
        "mutmut_exit": proc.returncode,
    }
    if proc.returncode != 0 and not status:
        summary["error"] = (proc.stdout + proc.stderr)[-3000:]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"modules to mutate: {', '.join(MODULES)}")
    parser.add_argument("--all", action="store_true", help="every module in MODULES")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/peftlab-mutation"), help="where the copies go")
    args = parser.parse_args()
    names = list(MODULES) if args.all else args.modules
    if not names or set(names) - set(MODULES):
        parser.error(f"name modules from {list(MODULES)} or pass --all")
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    if not Path(mutmut).exists():
        print("mutmut is not installed: pip install 'peftlab[mutation]'", file=sys.stderr)
        return 2
    all_results = []
    for name in names:
        summary = run_module(name, args.scratch, args.jobs, mutmut)
        all_results.append(summary)
        counts = summary["counts"]
        print(f"{summary['module']}: {counts} killed share {summary['killed_share']} ({summary['seconds']} s)")
        for mutant in summary["survived"]:
            print(f"  survived: {mutant}")
        if "error" in summary:
            print(summary["error"])
    args.scratch.mkdir(parents=True, exist_ok=True)
    (args.scratch / "summary.json").write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

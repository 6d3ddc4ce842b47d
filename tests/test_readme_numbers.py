"""README.md's measured numbers are generated from committed results files and stay in sync."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_numbers)


def test_readme_matches_its_results_files(capsys):
    assert readme_numbers.main(["--check"]) == 0, capsys.readouterr().err


def test_sentence_comes_from_the_results_and_a_stale_readme_is_caught():
    results = json.loads(readme_numbers.ACCEPTANCE.read_text(encoding="utf-8"))
    text = readme_numbers.acceptance(results)
    for run in results["runs"]:
        assert f"{readme_numbers.LABELS[run['name']]} {100 * run['accuracy']:.1f}%" in text
    assert results["runs"][0]["environment"]["git_commit"][:7] in text

    edited = copy.deepcopy(results)
    edited["runs"][0]["accuracy"] += 0.05
    assert readme_numbers.acceptance(edited) != text
    stale = ROOT.joinpath("README.md").read_text(encoding="utf-8").replace(text, readme_numbers.acceptance(edited))
    assert readme_numbers.render(stale) != stale  # regenerating would change it back

    edited["runs"][1]["status"] = "failed"
    with pytest.raises(SystemExit, match="did not finish"):
        readme_numbers.acceptance(edited)

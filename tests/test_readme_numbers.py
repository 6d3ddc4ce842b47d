"""README.md's measured numbers are generated from committed results files and stay in sync."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_numbers)


def _results(lora_accuracy: float, status: str = "ok") -> dict:
    env = {"versions": {"torch": "2.13.0"}, "git_commit": "0123456789abcdef", "cpu_count": 2}
    runs = [("ia3", 0.8062, 61.0), ("lora", lora_accuracy, 40.5), ("full", 0.7993, 60.0)]
    return {"runs": [{"name": n, "status": status if n == "lora" else "ok", "accuracy": a, "total_seconds": t,
                      "environment": env} for n, a, t in runs]}


@pytest.mark.skipif(bool(readme_numbers.missing_results()),
                    reason=f"{readme_numbers.ACCEPTANCE.name} not committed yet: run the acceptance study, then "
                           f"tools/readme_numbers.py --from results/minilm-sst2-compare/results.json")
def test_readme_matches_its_results_files(capsys):
    assert readme_numbers.main(["--check"]) == 0, capsys.readouterr().err


def test_the_marked_section_is_rendered_from_the_results_file(tmp_path, monkeypatch):
    results = tmp_path / "acceptance.json"
    results.write_text(json.dumps(_results(0.8016)), encoding="utf-8")
    monkeypatch.setitem(readme_numbers.SECTIONS, "acceptance", (results, readme_numbers.acceptance))
    readme = "intro (<!-- numbers:acceptance -->old numbers<!-- /numbers:acceptance -->) rest"
    rendered = readme_numbers.render(readme)
    assert rendered.startswith("intro (<!-- numbers:acceptance -->IA3 80.6%, LoRA 80.2%, full fine-tuning 79.9% on the 872")
    assert "2 min 42 s for the three runs on 2 CPU cores, commit 0123456, torch 2.13.0" in rendered
    assert rendered.endswith("<!-- /numbers:acceptance -->) rest") and readme_numbers.render(rendered) == rendered

    results.write_text(json.dumps(_results(0.8165)), encoding="utf-8")  # a new run: the README follows it
    assert "LoRA 81.7%" in readme_numbers.render(rendered)
    results.write_text(json.dumps(_results(0.8165, status="failed")), encoding="utf-8")
    with pytest.raises(SystemExit, match="did not finish"):
        readme_numbers.render(rendered)
    with pytest.raises(SystemExit, match="no <!-- numbers:acceptance -->"):
        readme_numbers.render("a README without the markers")

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
    monkeypatch.setattr(readme_numbers, "SECTIONS", {"acceptance": ((results,), readme_numbers.acceptance)})
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


def test_causal_rows_show_each_ratio_from_its_results_file():
    rows = {"lora/peftlab": {"median_s": 2.0, "tokens_per_s": 512.0, "vs_peft": 0.5, "vs_no_gc": 1.2,
                             "memory_mb": {"peak_rss_rise_mb": 1500.0, "forward_held_mb": 2400.0}},
            "lora/peft": {"median_s": 4.0, "tokens_per_s": 256.0, "vs_no_gc": 1.3,
                          "memory_mb": {"peak_rss_rise_mb": 3000.0, "forward_held_mb": 4800.0}},
            "lora_gc/peftlab": {"memory_mb": {"peak_rss_rise_mb": 700.0, "forward_held_mb": 600.0}}}
    results = {"results": rows}
    cell = readme_numbers._causal_cell
    assert cell(results, "lora/peftlab", "lora/peft", "step") == ("2.00 s, 512 tokens/s (**0.50x**)", "4.00 s, 256 tokens/s")
    assert cell(results, "lora/peftlab", "lora/peft", "no_gc") == ("**1.20x**", "1.30x")
    assert cell(results, "lora/peftlab", "lora/peft", "rss") == ("1,500 MB (**0.50x**)", "3,000 MB")
    assert cell(results, "lora/peftlab", "lora_gc/peftlab", "forward_held_mb") == ("2,400 / 600 MB (**4.0x less**)", "")
    assert cell(results, "lora/peftlab", "lora_gc/peftlab", "peak_rss_rise_mb") == ("1,500 / 700 MB (**2.1x less**)", "")


def test_a_seeded_study_is_quoted_as_mean_and_std_with_the_verdict():
    env = {"versions": {"torch": "2.13.0"}, "git_commit": "0123456789abcdef", "cpu_count": 2}
    labels = [i % 2 for i in range(100)]
    runs = []
    for name, wrong in (("ia3", (10, 12, 14)), ("lora", (11, 12, 13)), ("full", (40, 42, 44))):
        for seed, k in enumerate(wrong):
            preds = [1 - y if i < k else y for i, y in enumerate(labels)]
            runs.append({"name": f"{name}.s{seed}", "method": name, "status": "ok", "accuracy": 1 - k / 100,
                         "total_seconds": 100.0, "environment": env, "predictions": preds, "labels": labels,
                         "run": {"train": {"seed": seed}}, "test_source": "validation",
                         "eval_source": "872 rows of train (stratified)"})
    groups = {g: [f"{g}.s{s}" for s in range(3)] for g in ("ia3", "lora", "full")}
    text = readme_numbers.acceptance({"runs": runs, "groups": groups, "seeds": [0, 1, 2]})
    assert text.startswith("IA3 88.0 ± 2.0%, LoRA 88.0 ± 1.0%, full fine-tuning 58.0 ± 2.0% (mean ± std over 3 seeds; "
                           "full fine-tuning worse than IA3 in the paired comparison) on the 872 SST-2 validation sentences, "
                           "every choice made on a dev set (872 rows of train (stratified)); 15 min 0 s for the nine runs")

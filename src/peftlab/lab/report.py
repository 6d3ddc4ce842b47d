"""Reports built from results.json: a Markdown table and one self-contained HTML page.

The HTML embeds its plots as base64 PNGs, so the single file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import os

from peftlab.io import atomic_write_text
from peftlab.lab import plots
from peftlab.lab.results import RunResult, load_study

COLUMNS = ("run", "method", "status", "trainable params", "trainable %", "accuracy", "F1", "eval loss",
           "train time (s)", "peak RSS (MiB)", "peak CUDA (MiB)", "adapter size")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return "–"


def _causal(runs: list[RunResult]) -> bool:
    return any(r.task == "causal_lm" or r.perplexity is not None for r in runs)


def _quantized(runs: list[RunResult]) -> bool:
    return any(r.quantization for r in runs)


def _bf16(r: RunResult) -> bool:
    return bool((r.run.get("train") or {}).get("bf16"))


def columns(runs: list[RunResult]) -> tuple[str, ...]:
    """COLUMNS, plus perplexity for causal_lm studies, the base's storage for quantized ones and
    the compute precision when any run used bf16 autocast (its times and memory differ)."""
    extra = (("perplexity",) if _causal(runs) else ()) + (("base",) if _quantized(runs) else ())
    extra += ("precision",) if any(_bf16(r) for r in runs) else ()
    speed = ("tokens/s",) if _causal(runs) else ()
    return COLUMNS[:8] + extra + COLUMNS[8:9] + speed + COLUMNS[9:]


def _base(r: RunResult) -> str:
    q = r.quantization
    if not q:
        return "full precision"
    kind = f"{q['bits']}-bit" + (f" {q['quant_type']}" if q.get("quant_type") else "") + (" +dq" if q.get("double_quant") else "")
    return kind + (f" ({_size(q['weight_bytes'])} linear weights)" if q.get("weight_bytes") else "")


def rows(runs: list[RunResult]) -> list[list[str]]:
    causal, quantized, mixed_precision = _causal(runs), _quantized(runs), any(_bf16(r) for r in runs)
    out = []
    for r in runs:
        share = 100 * r.trainable_params / r.total_params if r.trainable_params and r.total_params else None
        out.append([
            r.name, r.method, r.status, _fmt(r.trainable_params, ","), _fmt(share, ".3f"),
            _fmt(None if r.accuracy is None else 100 * r.accuracy, ".2f"), _fmt(None if r.f1 is None else 100 * r.f1, ".2f"),
            _fmt(r.eval_loss, ".4f"),
            *([_fmt(r.perplexity, ".3f")] if causal else []), *([_base(r)] if quantized else []),
            *(["bf16 autocast" if _bf16(r) else "fp32"] if mixed_precision else []),
            _fmt(r.train_seconds, ".1f"), *([_fmt(r.tokens_per_second, ".0f")] if causal else []), _fmt(r.peak_rss_mb, ".0f"), _fmt(r.cuda_peak_mb, ".0f"),
            _size(r.adapter_bytes),
        ])
    return out


def markdown(name: str, runs: list[RunResult]) -> str:
    cols = columns(runs)
    lines = [f"# {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs)]
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["", "## Problems", ""] + [f"- **{r.name}** ({r.status}): {r.error}" for r in failed]
    lines += ["", "Accuracy and F1 in %, on the evaluation split after the last epoch; time is training wall time.", ""]
    if _causal(runs):
        lines += ["Causal-LM runs: accuracy is the exact match of the greedily generated label word; perplexity is "
                  "that of the answer tokens (eval loss is their mean negative log-likelihood).", ""]
    causal = _causal(runs)
    epochs = [(r, e) for r in runs for e in r.epochs]
    if epochs:
        head = "| run | epoch | train loss | eval loss | accuracy | F1 |" + (" perplexity |" if causal else "") + " seconds |"
        lines += ["## Per epoch", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r, e in epochs:
            lines.append(f"| {r.name} | {e.epoch} | {_fmt(e.train_loss, '.4f')} | {_fmt(e.eval_loss, '.4f')} | "
                         f"{_fmt(None if e.accuracy is None else 100 * e.accuracy, '.2f')} | "
                         f"{_fmt(None if e.f1 is None else 100 * e.f1, '.2f')} | "
                         + (f"{_fmt(e.perplexity, '.3f')} | " if causal else "") + f"{_fmt(e.seconds, '.1f')} |")
        lines.append("")
    env = next((r.environment for r in runs if r.environment), None)
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines += [f"Environment: {versions}; device {env.get('device')}; commit {env.get('git_commit')}.", ""]
    return "\n".join(lines)


def html_page(name: str, runs: list[RunResult], images: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns(runs))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows(runs))
    figures = ""
    for title, path in images.items():
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        figures += f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}</figcaption></figure>\n'
    problems = "".join(f"<li><b>{html.escape(r.name)}</b> ({html.escape(r.status)}): {html.escape(r.error or '')}</li>"
                       for r in runs if r.error)
    details = html.escape(json.dumps([{"name": r.name, "config": r.config, "run": r.run, "environment": r.environment}
                                      for r in runs], indent=2))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
             "td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(name)}</h1><table><tr>{head}</tr>{body}</table>"
            + (f"<h2>Problems</h2><ul>{problems}</ul>" if problems else "")
            + f"<h2>Plots</h2>{figures}<h2>Configurations</h2><pre>{details}</pre></body></html>")


def build(output_dir: str) -> dict[str, str]:
    """(Re)write results.md, the plots and report.html from ``output_dir/results.json``."""
    name, runs, _ = load_study(output_dir)
    images = plots.draw_all(runs, os.path.join(output_dir, "plots"))
    md_path = os.path.join(output_dir, "results.md")
    html_path = os.path.join(output_dir, "report.html")
    atomic_write_text(md_path, markdown(name, runs))
    atomic_write_text(html_path, html_page(name, runs, images))
    return {"markdown": md_path, "html": html_path, **images}

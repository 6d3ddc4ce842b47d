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
from peftlab.lab.summary import GroupSummary, best_group, final_runs, peak_mb, summarize

COLUMNS = ("run", "method", "status", "trainable params", "trainable %", "accuracy", "F1", "eval loss",
           "train time (s)", "peak RSS (MiB)", "peak CUDA (MiB)", "adapter size", "tokens/s", "wall time (s)")


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


def _heldout(runs: list[RunResult]) -> bool:
    return any(r.test_source for r in runs)


def columns(runs: list[RunResult]) -> tuple[str, ...]:
    """COLUMNS, plus perplexity for causal_lm studies, the base's storage for quantized ones and
    the compute precision when any run used bf16 autocast (its times and memory differ). With a
    held-out test split, accuracy / F1 / loss are the test's and dev accuracy + best epoch follow."""
    extra = (("dev accuracy", "best epoch") if _heldout(runs) else ())
    extra += (("perplexity",) if _causal(runs) else ()) + (("base",) if _quantized(runs) else ())
    extra += ("precision",) if any(_bf16(r) for r in runs) else ()
    head = COLUMNS[:8]
    if _heldout(runs):
        head = head[:5] + ("test accuracy", "test F1", "test loss")
    return head + extra + COLUMNS[8:]


def _base(r: RunResult) -> str:
    q = r.quantization
    if not q:
        return "full precision"
    kind = f"{q['bits']}-bit" + (f" {q['quant_type']}" if q.get("quant_type") else "") + (" +dq" if q.get("double_quant") else "")
    return kind + (f" ({_size(q['weight_bytes'])} linear weights)" if q.get("weight_bytes") else "")


def rows(runs: list[RunResult]) -> list[list[str]]:
    causal, quantized, mixed_precision = _causal(runs), _quantized(runs), any(_bf16(r) for r in runs)
    heldout = _heldout(runs)
    out = []
    for r in runs:
        share = 100 * r.trainable_params / r.total_params if r.trainable_params and r.total_params else None
        out.append([
            r.name, r.method, r.status, _fmt(r.trainable_params, ","), _fmt(share, ".3f"),
            _fmt(None if r.accuracy is None else 100 * r.accuracy, ".2f"), _fmt(None if r.f1 is None else 100 * r.f1, ".2f"),
            _fmt(r.eval_loss, ".4f"),
            *([_fmt(None if r.dev_accuracy is None else 100 * r.dev_accuracy, ".2f"), _fmt(r.best_epoch, "d")] if heldout else []),
            *([_fmt(r.perplexity, ".3f")] if causal else []), *([_base(r)] if quantized else []),
            *(["bf16 autocast" if _bf16(r) else "fp32"] if mixed_precision else []),
            _fmt(r.train_seconds, ".1f"), _fmt(r.peak_rss_mb, ".0f"), _fmt(r.cuda_peak_mb, ".0f"),
            _size(r.adapter_bytes), _fmt(r.tokens_per_second, ".0f"), _fmt(r.total_seconds, ".1f"),
        ])
    return out


def splits_line(runs: list[RunResult]) -> str:
    """Which split chose what and which split the reported numbers are on."""
    r = next((r for r in runs if r.num_train), None)
    if r is None:
        return ""
    if _heldout(runs):
        return (f"Splits: train {r.num_train} rows; **dev** {r.eval_source} ({r.num_eval} rows), used for every choice "
                f"(best epoch, swept settings) and the per-epoch curves; **test** {r.test_source} ({r.num_test} rows), "
                f"scored once after training and reported below, never used for a choice.")
    return (f"Splits: train {r.num_train} rows; evaluation {r.eval_source} ({r.num_eval} rows), reported after the last "
            f"epoch. There is no held-out test split (set data.dev_split to choose on dev and report on test).")


def _pm(s) -> str:  # noqa: ANN001 - a stats.Summary
    if s is None:
        return "–"
    return f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else "")


def _interval(s) -> str:  # noqa: ANN001
    return "–" if s is None or s.low is None else f"[{s.low:.2f}, {s.high:.2f}]"


def _vs_best(g: GroupSummary, best: GroupSummary | None) -> str:
    if g is best:
        return "best"
    c = g.vs_best
    if c is None:
        return "–"
    mark = " **worse**" if c.marked else (" (n.s.)" if c.n_seeds >= 2 else " (one seed: not tested)")
    return f"{100 * c.diff:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}]{mark}"


def _setting(setting: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "–"


def seeds_cell(g: GroupSummary) -> str:
    """How many seeds finished, then which: "1 (seed 0)", "3 (seeds 0, 1, 2)" (a bare 0 reads as "none")."""
    if not g.runs:
        return f"0 ({len(g.failed)} failed)" if g.failed else "0"
    which = f"seed {g.seeds[0]}" if len(g.seeds) == 1 else "seeds " + ", ".join(str(s) for s in g.seeds)
    return f"{len(g.runs)} ({which})" + (f", {len(g.failed)} failed" if g.failed else "")


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def verdicts(groups: list[GroupSummary], split: str) -> list[str]:
    """One sentence per comparison with the best run, first the best itself: what the study shows."""
    scored = [g for g in groups if g.accuracy is not None]
    best = best_group(groups)
    if best is None:
        return []
    n = len(best.runs)
    lines = [f"Highest {split} accuracy: **{best.name}**, {_pm(best.accuracy)}% "
             f"({n} seed{'s' if n != 1 else ''}{'' if n > 1 else ': its ± over seeds is unknown'})."]
    for g in scored:
        if g is best:
            continue
        c = g.vs_best
        if c is None:
            lines.append(f"{g.name} vs {best.name}: not compared (their runs kept no predictions on the same rows).")
            continue
        seeds = f"{c.n_seeds} seed{'s' if c.n_seeds != 1 else ''}"
        gap = f"{_points(c.diff)} points, 95% interval [{_points(c.low)}, {_points(c.high)}]"
        if c.marked:
            lines.append(f"**{g.name} is worse than {best.name}** ({seeds}): {gap}, behind at every seed.")
        elif c.n_seeds < 2:
            lines.append(f"{g.name} and {best.name} are not shown to differ ({seeds}, which cannot test it): {gap}.")
        elif c.low > 0 or c.high < 0:
            lines.append(f"{g.name} and {best.name} are not shown to differ ({seeds}): {gap}, but the seeds disagree on the order.")
        else:
            lines.append(f"{g.name} and {best.name} are not shown to differ ({seeds}): {gap}.")
    return lines


def summary_table(groups: list[GroupSummary], split: str) -> list[str]:
    best = best_group(groups)
    head = ("| run | method | setting | seeds | trainable params | " + split + " accuracy (mean ± std) | 95% interval | "
            "vs best: difference [95% CI] | train time (s) | tokens/s | peak memory (MiB) | Pareto (params / time) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in groups:
        pareto = "/".join(m for m, on in (("params", g.pareto_params), ("time", g.pareto_time)) if on) or "–"
        seeds = seeds_cell(g)
        lines.append(f"| {g.name} | {g.method} | {_setting(g.setting)} | {seeds or '–'} | {_fmt(g.trainable_params, ',')} | "
                     f"{_pm(g.accuracy)} | {_interval(g.accuracy)} | {_vs_best(g, best)} | {_pm(g.seconds)} | "
                     f"{_fmt(g.tokens_per_second, ',.0f')} | {_fmt(g.peak_mb, '.0f')} | {pareto} |")
    return lines


TEST_NOTE = ("Accuracy in %; ± is the sample standard deviation over seeds, the interval the t-based 95% interval of "
             "the mean. *vs best* compares each run with the best mean: the difference of seed-averaged accuracy with "
             "a 95% paired bootstrap interval ({n} resamples of the evaluated examples, the same examples for both "
             "methods); it is marked **worse** only when that interval excludes 0 *and* the run is behind the best "
             "at every seed (paired by seed, so at least two seeds are needed), otherwise n.s. (not shown to differ). Pareto: no other run is both "
             "at least as accurate and at most as costly in trainable parameters / training time.")


def sweep_lines(raw: dict) -> list[str]:
    selection = raw.get("selection") or {}
    if not selection:
        return []
    lines = ["## Sweeps (dev accuracy at each run's best epoch; the chosen setting is carried to the seeds)", "",
             "| run | setting | dev accuracy | chosen |", "|---|---|---|---|"]
    for group, sel in selection.items():
        for point in sel.get("dev_curve") or []:
            acc = point.get("dev_accuracy")
            chosen = "✓" if sel.get("setting") is not None and point.get("setting") == sel.get("setting") else ""
            lines.append(f"| {group} | {_setting(point.get('setting') or {})} | "
                         f"{_fmt(None if acc is None else 100 * acc, '.2f') if acc is not None else 'failed'} | {chosen} |")
    return lines + [""]


def _delta(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return "–"
    return f"{100 * (value - ref) / ref:+.0f}%"


def epoch_table(runs: list[RunResult]) -> list[str]:
    """The classic fine-tuning table: per epoch train / validation (dev) loss and accuracy, with each
    run's trainable parameters, time and peak memory and their change against full fine-tuning
    (or, without a full run, the first run)."""
    causal, heldout = _causal(runs), _heldout(runs)
    shown = [r for r in runs if r.epochs]
    if not shown:
        return []
    ref = next((r for r in shown if r.method == "full"), shown[0])
    val = "dev" if heldout else "validation"
    head = (f"| run | trainable params | epoch | train loss | {val} loss | {val} accuracy | {val} F1 |"
            + (" perplexity |" if causal else "") + " epoch time (s) | train time (s) | time vs " + ref.name
            + " | peak memory (MiB) | memory vs " + ref.name + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in shown:
        share = 100 * r.trainable_params / r.total_params if r.trainable_params and r.total_params else None
        for i, e in enumerate(r.epochs):
            first = i == 0
            params = f"{r.trainable_params:,} ({share:.2f}%)" if first and r.trainable_params and share is not None else ""
            lines.append(
                f"| {r.name if first else ''} | {params} | {e.epoch} | {_fmt(e.train_loss, '.4f')} | {_fmt(e.eval_loss, '.4f')} | "
                f"{_fmt(None if e.accuracy is None else 100 * e.accuracy, '.2f')} | {_fmt(None if e.f1 is None else 100 * e.f1, '.2f')} | "
                + (f"{_fmt(e.perplexity, '.3f')} | " if causal else "") + f"{_fmt(e.seconds, '.1f')} | "
                + (f"{_fmt(r.train_seconds, '.1f')} | {_delta(r.train_seconds, ref.train_seconds)} | "
                   f"{_fmt(peak_mb(r), '.0f')} | {_delta(peak_mb(r), peak_mb(ref))} |" if first else "| | | |"))
    return lines


def markdown(name: str, runs: list[RunResult], raw: dict | None = None) -> str:
    raw = raw or {}
    cols = columns(runs)
    lines = [f"# {name}", ""]
    verdict = verdicts(summarize(runs, raw), "test" if _heldout(runs) else "eval")
    if len(verdict) > 1:
        lines += ["## Verdict", ""] + [f"- {v}" for v in verdict] + [""]
    if splits_line(runs):
        lines += [splits_line(runs), ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs)]
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["", "## Problems", ""] + [f"- **{r.name}** ({r.status}): {r.error}" for r in failed]
    where = "the test split, at the best epoch on dev" if _heldout(runs) else "the evaluation split after the last epoch"
    lines += ["", (f"Accuracy and F1 in %, on {where}; train time is training wall time (evaluation included), wall time "
                   f"the whole run; tokens/s counts non-padding training tokens per second of training steps."), ""]
    if _causal(runs):
        lines += ["Causal-LM runs: accuracy is the exact match of the greedily generated label word; perplexity is "
                  "that of the answer tokens (eval loss is their mean negative log-likelihood).", ""]
    groups = summarize(runs, raw)
    if groups:
        from peftlab.lab.stats import BOOTSTRAP_RESAMPLES

        lines += ["## Summary" + (" over seeds" if raw.get("seeds") else ""), ""]
        lines += summary_table(groups, "test" if _heldout(runs) else "eval")
        lines += ["", TEST_NOTE.format(n=BOOTSTRAP_RESAMPLES), ""]
    lines += sweep_lines(raw)
    finals = [r for members in final_runs(runs, raw).values() for r in members[:1]]
    table = epoch_table(finals)
    if table:
        lines += ["## Per epoch" + (" (first seed of each run)" if raw.get("seeds") else ""), ""] + table + [""]
    env = next((r.environment for r in runs if r.environment), None)
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines += [f"Environment: {versions}; device {env.get('device')}; commit {env.get('git_commit')}.", ""]
    return "\n".join(lines)


_SECTIONS = ("## Summary", "## Sweeps", "## Per epoch")


def _inline(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def sections_html(text: str) -> str:
    """The Markdown report's summary, sweep and per-epoch sections as HTML (headings, tables, paragraphs)."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith(_SECTIONS)), None)
    if start is None:
        return ""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not set(row) <= set("|-")]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
                       + "</table>")
            table.clear()

    for line in lines[start:]:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.strip() and not line.startswith("Environment:"):
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _configuration(r: RunResult) -> str:
    """One run's configuration as a collapsed section: what it is in the summary line, the JSON inside."""
    train = r.run.get("train") or {}
    brief = [r.method]
    if train.get("learning_rate") is not None:
        brief.append(f"lr {train['learning_rate']:g}")
    for key in ("r", "lora_alpha"):
        if isinstance(r.config, dict) and r.config.get(key) is not None:
            brief.append(f"{key} {r.config[key]}")
    if "seed" in train:
        brief.append(f"seed {train['seed']}")
    body = html.escape(json.dumps({"config": r.config, "run": r.run, "environment": r.environment}, indent=2))
    return f"<details><summary><b>{html.escape(r.name)}</b>: {html.escape(', '.join(brief))}</summary><pre>{body}</pre></details>"


def html_page(name: str, runs: list[RunResult], images: dict[str, str], text: str = "",
              captions: dict[str, str] | None = None, raw: dict | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns(runs))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows(runs))
    figures = ""
    for title, path in images.items():
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        caption = (captions or {}).get(title, "")
        figures += (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"><figcaption><b>{html.escape(title)}.</b>'
                    f'{" " + html.escape(caption) if caption else ""}</figcaption></figure>\n')
    problems = "".join(f"<li><b>{html.escape(r.name)}</b> ({html.escape(r.status)}): {html.escape(r.error or '')}</li>"
                       for r in runs if r.error)
    verdict = verdicts(summarize(runs, raw or {}), "test" if _heldout(runs) else "eval")
    lead = "".join(f"<p>{_inline(v)}</p>" for v in verdict) if len(verdict) > 1 else ""
    configurations = "".join(_configuration(r) for r in runs)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
             "td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}"
             ".verdict{border-left:4px solid #36c;background:#f3f6fb;padding:0.2em 1em;margin:1em 0}"
             "figure{margin:1.5em 0}figcaption{max-width:700px;color:#333;font-size:0.95em}"
             "details{margin:0.3em 0}summary{cursor:pointer}pre{background:#f7f7f7;padding:0.5em;overflow:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(name)}</h1>" + (f'<div class="verdict">{lead}</div>' if lead else "")
            + (f"<p>{_inline(splits_line(runs))}</p>" if splits_line(runs) else "")
            + f"<table><tr>{head}</tr>{body}</table>"
            + (f"<h2>Problems</h2><ul>{problems}</ul>" if problems else "") + sections_html(text)
            + f"<h2>Plots</h2>{figures}<h2>Configurations</h2>{configurations}</body></html>")


def build(output_dir: str) -> dict[str, str]:
    """(Re)write results.md, the plots and report.html from ``output_dir/results.json``."""
    name, runs, raw = load_study(output_dir)
    images = plots.draw_all(runs, os.path.join(output_dir, "plots"), raw)
    md_path = os.path.join(output_dir, "results.md")
    html_path = os.path.join(output_dir, "report.html")
    text = markdown(name, runs, raw)
    atomic_write_text(md_path, text)
    atomic_write_text(html_path, html_page(name, runs, images, text, plots.captions(runs, raw), raw))
    return {"markdown": md_path, "html": html_path, **images}

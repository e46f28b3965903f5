"""The run summary: everything a run holds, in one report, each section there when its stage has run.

`report` prints the gap report (analysis.gaps) and then these sections, appends them to report.txt
and writes `reports/summary.json`:
- alignment: per adapter (`RunDir.adapters`: each language's and the joint one), the held-out activation gain
  of its targets, English retention, the perplexities before/after and the gain report's headline (closure,
  norm-adjusted gain, English KL, FVE drop, bits per byte, guards) (its before_after.json); sweep points
  are counted and left to `python -m analysis.align_sweep RUN`;
- evaluation: per model, task and language the primary metric (mean ± SE) and accuracy; per adapter the
  paired difference with its CI; bits per byte; the strongest gap ↔ performance correlations
  (RUN/eval/results.json).
A section whose stage has not run says which command produces it. torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from toolkit.files import write_json
from toolkit.rundir import ReportFolder, RunDir, is_point

TOP_CORRELATIONS = 6


def collect(run_dir: str | Path, gaps: dict | None = None) -> dict:
    """The summary of a run as plain data: gaps headline, alignment and evaluation sections."""
    run = Path(run_dir)
    return {"format": "lingogap-summary", "version": 1, "run": str(run.resolve()),
            "gaps": gaps, "alignment": _alignment(run), "sweep_points": _sweep_points(run),
            "evaluation": _evaluation(run)}


def write(summary: dict, out: ReportFolder) -> Path:
    return write_json(out.summary_json, summary)


def renderables(summary: dict) -> list:
    """Rich tables (or one line saying how to produce the section) for alignment and evaluation."""
    run = summary["run"]
    out: list = []
    align = summary["alignment"]
    if align:
        out.append(_alignment_table(align))
        if any(a.get("summary") for a in align):
            out.append(_gain_table(align))
    elif not summary.get("sweep_points"):
        out.append(Text(f"alignment: not run — python -m toolkit.submit align --run {run} --targets ml,hi",
                        style="dim"))
    if summary.get("sweep_points"):
        out.append(Text(f"alignment sweep: {summary['sweep_points']} point adapter(s) in {run}/align/*@* — "
                        f"python -m analysis.align_sweep {run}", style="dim"))
    ev = summary["evaluation"]
    if ev is None:
        out.append(Text(f"evaluation: not run — python -m toolkit.submit evaluate --run {run} --tasks arc,mmlu "
                        "--bench-data DIR", style="dim"))
    elif "error" in ev:
        out.append(Text(f"evaluation: {ev['error']}", style="yellow"))
    else:
        out += _evaluation_tables(ev)
    return out


def render_text(summary: dict, width: int = 80) -> str:
    import io

    from rich.console import Console

    console = Console(record=True, width=width, file=io.StringIO())
    console.print(Group(*renderables(summary)))
    return console.export_text()


def _alignment(run: Path) -> list[dict]:
    out = []
    run_dir = RunDir(run)
    for name in run_dir.adapters(points=False):
        path = run_dir.gain_report(name)
        if not path.is_file():
            out.append({"adapter": name, "error": f"not measured: no {path} (align.heldout 0, or align stopped "
                                                  "before its before/after measurement; rerun align)"})
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            out.append({"adapter": name, "error": f"{path} is unreadable ({exc}); rerun align"})
            continue
        langs = data.get("languages", {})
        out.append({
            "adapter": name, "targets": data.get("targets", []),
            "heldout_sentences": data.get("heldout_sentences"),
            "english_retention_pct": data.get("english_retention_pct"),
            "languages": {lang: {k: v.get(k) for k in ("role", "gain_pct_mean", "gain_pct_pooled",
                                                       "retention_pct_mean", "ppl_before", "ppl_after")}
                          for lang, v in langs.items()},
            "summary": data.get("summary"),
        })
    return out


def _sweep_points(run: Path) -> int:
    return sum(map(is_point, RunDir(run).adapters()))


def _evaluation(run: Path) -> dict | None:
    path = RunDir(run).eval_results
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{path} is unreadable ({exc}); rerun evaluate"}
    correlations = sorted((c for c in data.get("correlations", []) if _finite_number(c.get("spearman_p"))),
                          key=lambda c: c["spearman_p"])
    return {"primary": data.get("config", {}).get("primary", {}), "results": data.get("results", []),
            "comparisons": data.get("comparisons", []), "bpb": data.get("bpb", []),
            "bpb_comparisons": data.get("bpb_comparisons", []), "correlations": correlations[:TOP_CORRELATIONS]}


def _alignment_table(adapters: list[dict]) -> Table:
    table = Table(title="alignment · held-out activation gain and English retention (means over layers)",
                  title_justify="left")
    for col in ("adapter", "language", "role", "gain %", "retention %", "ppl before", "ppl after"):
        table.add_column(col, justify="left" if col in ("adapter", "language", "role") else "right")
    for a in adapters:
        if "error" in a:
            table.add_row(a["adapter"], a["error"], "", "", "", "", "")
            continue
        shown = [lang for lang, v in a["languages"].items() if v["role"] in ("target", "reference")]
        for k, lang in enumerate(shown):
            v = a["languages"][lang]
            table.add_row(a["adapter"] if k == 0 else "", lang, v["role"], _num(v["gain_pct_mean"], "+.1f"),
                          _num(v["retention_pct_mean"], ".1f"), _num(v["ppl_before"], ".1f"),
                          _num(v["ppl_after"], ".1f"), end_section=k == len(shown) - 1)
    return table


def _gain_table(adapters: list[dict]) -> Table:
    """The gain report's headline per adapter (before_after.json `summary`; docs/alignment.md)."""
    table = Table(title="alignment · gain report over the weighted layers (closure 100 = parity with English)",
                  title_justify="left")
    cols = ("adapter", "objective", "closure %", "norm-adj. gain %", "gain %", "EN KL", "EN retention %",
            "FVE drop", "target bpb", "min", "guards")
    for col in cols:
        table.add_column(col, justify="left" if col in ("adapter", "objective", "guards") else "right")
    for a in adapters:
        s = a.get("summary")
        if not s:
            continue
        failed = [k for k, ok in s.get("guards", {}).items() if not ok]
        table.add_row(a["adapter"], s["objective"], _num(s["closure_pct"], ".1f"),
                      _num(s["norm_adjusted_gain_pct"], "+.1f"), _num(s["gain_pct"], "+.1f"),
                      _num(s["english_kl"], ".4f"), _num(s["english_retention_pct"], ".1f"),
                      _num(s["fve_drop"], "+.3f"), _num(s["target_bpb"], ".3f"), _num(s["minutes"], ".1f"),
                      "ok" if s["guards_ok"] else "fail: " + ", ".join(failed))
    return table


def _evaluation_tables(ev: dict) -> list:
    out: list = []
    models = list(dict.fromkeys(r["model"] for r in ev["results"]))
    for task in dict.fromkeys(r["task"] for r in ev["results"]):
        metric = ev["primary"].get(task, "p_gold")
        table = Table(title=f"evaluation · {task} · {metric} (mean ± SE) and acc", title_justify="left")
        table.add_column("language")
        for model in models:
            table.add_column(model, justify="right")
        deltas = {(c["model"], c["language"]): c for c in ev["comparisons"] if c["task"] == task}
        for lang in dict.fromkeys(r["language"] for r in ev["results"] if r["task"] == task):
            cells = []
            for model in models:
                r = next((x for x in ev["results"] if (x["model"], x["task"], x["language"]) == (model, task, lang)),
                         None)
                cells.append(_score_cell(r, metric, deltas.get((model, lang))))
            table.add_row(lang, *cells)
        out.append(table)
    if ev["bpb"]:
        out.append(_bpb_table(ev, models))
    if ev["correlations"]:
        out.append(_correlation_table(ev["correlations"]))
    return out


def _score_cell(r: dict | None, metric: str, delta: dict | None) -> str:
    if r is None or r.get("status") != "ok":
        return "missing" if r else "—"
    text = f"{_num(r.get(metric), '.3f')}±{_num(r.get(metric + '_stderr'), '.3f')} acc {_num(r.get('acc'), '.2f')}"
    if delta and _finite_number(delta.get(f"delta_{metric}")):
        text += (f"\nΔ {delta[f'delta_{metric}']:+.3f} [{_num(delta.get(f'delta_{metric}_ci_low'), '+.3f')}, "
                 f"{_num(delta.get(f'delta_{metric}_ci_high'), '+.3f')}]")
    return text


def _bpb_table(ev: dict, models: list[str]) -> Table:
    table = Table(title="bits per byte on held-out corpus sentences (lower is better)", title_justify="left")
    table.add_column("model")
    langs = list(dict.fromkeys(b["language"] for b in ev["bpb"]))
    for lang in langs:
        table.add_column(lang, justify="right")
    for model in models:
        values = {b["language"]: b.get("bpb") for b in ev["bpb"] if b["model"] == model}
        if values:
            table.add_row(model, *[_num(values.get(lang), ".3f") for lang in langs])
    return table


def _correlation_table(rows: list[dict]) -> Table:
    table = Table(title="gap ↔ performance across languages (strongest; 9-10 points make a weak test)",
                  title_justify="left")
    for col in ("band", "model", "task", "y", "n", "spearman", "p", "pearson", "p"):
        table.add_column(col, justify="right" if col in ("n", "spearman", "pearson", "p") else "left")
    for c in rows:
        table.add_row(c["band"], c["model"], c["task"], c["y"], str(c.get("n", "")), _num(c.get("spearman"), "+.2f"),
                      _num(c.get("spearman_p"), ".3f"), _num(c.get("pearson"), "+.2f"), _num(c.get("pearson_p"), ".3f"))
    return table


def _num(value, fmt: str) -> str:
    return format(value, fmt) if _finite_number(value) else "—"


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""What an evaluation leaves: results.json, results.csv, items.csv, bpb.csv, the figures, and Rich tables."""

from __future__ import annotations

import math
from pathlib import Path

from toolkit import files
from toolkit.evaluation import correlate, metrics
from toolkit.evaluation.scoring import Scores
from toolkit.evaluation.tasks import BENCHMARKS
from toolkit.files import write_json
from toolkit.languages import LANGUAGES
from toolkit.rundir import RunDir

CHANCE = 0.25  # four options (a few ARC items have three or five)
ITEM_METRICS = metrics.ACCURACY + metrics.CONTINUOUS


def write_outputs(result: dict, scores: dict[str, dict[tuple[str, str], Scores]], run: RunDir,
                  bits: dict[str, dict[str, dict]] | None = None) -> None:
    """RUN/eval: results.json (atomically: it is what later stages and readers trust), results.csv, items.csv,
    bpb.csv, figures."""
    run.eval.mkdir(parents=True, exist_ok=True)
    write_json(run.eval_results, result)
    write_csv(result, run.eval_table)
    files.write_csv(run.eval_items, ["model", "task", "language", "item", *ITEM_METRICS, "pred", "gold", "lls"],
                    ([label, task, lang, key, *(int(v[m]) for m in metrics.ACCURACY),
                      *(f"{v[m]:.6g}" for m in metrics.CONTINUOUS), v["pred"], v["gold"],
                      " ".join(f"{x:.6g}" for x in v["lls"])]
                     for label, per_task in scores.items() for (task, lang), s in per_task.items()
                     for key, v in s.items.items()))
    files.write_csv(run.eval_bpb, ["model", "language", "sentence", "bpb"],
                    ([label, lang, sid, f"{v:.6g}"] for label, per_lang in (bits or {}).items()
                     for lang, b in per_lang.items() for sid, v in b["sentences"].items()))
    figure(result["results"], run.eval_figures / "accuracy.png")
    figure(result["results"], run.eval_figures / "p_gold.png", "p_gold")
    if result.get("gaps"):
        correlate.figure(result["correlations"], result["gaps"]["bands"], result["results"], result.get("bpb", []),
                         run.eval_figures / "gap_vs_performance.png")


def figure(results: list[dict], path: str | Path, metric: str = "acc") -> Path:
    """A metric (acc, p_gold, ...) per language, one panel per benchmark, a bar per model with standard-error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in results if r["status"] == "ok"]
    benches = [b for b in BENCHMARKS if any(r["task"] == b for r in ok)]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig = Figure(figsize=(max(6.0, 0.9 * len(LANGUAGES) * max(1, len(models)) / 1.6), 3.2 * max(1, len(benches))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(benches)), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(models))
    for ax, bench in zip(axes, benches, strict=False):
        langs = [c for c in LANGUAGES if any(r["task"] == bench and r["language"] == c for r in ok)]
        for k, model in enumerate(models):
            rows = {r["language"]: r for r in ok if r["task"] == bench and r["model"] == model}
            xs = [i + (k - (len(models) - 1) / 2) * width for i, c in enumerate(langs) if c in rows]
            ys = [rows[c][metric] for c in langs if c in rows]
            es = [rows[c][f"{metric}_stderr"] or 0.0 for c in langs if c in rows]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=model)
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.set_title(BENCHMARKS[bench].title)
        ax.legend(fontsize="small", ncols=min(4, len(models) + 1), loc="upper right")
    fig.tight_layout()
    return files.save_figure(fig, path, dpi=150)


CONTINUOUS_COLUMNS = [c for m in metrics.CONTINUOUS for c in (m, f"{m}_stderr")]
PAIRED_COLUMNS = ["base_acc", "delta_acc", "delta_acc_norm", "base_only", "adapted_only", "p_mcnemar",
                  "retention_pct", *(f"{p}{m}{q}" for m in metrics.CONTINUOUS
                                     for p, q in (("base_", ""), ("delta_", ""), ("delta_", "_ci_low"),
                                                  ("delta_", "_ci_high"), ("p_", "")))]
CSV_COLUMNS = ["model", "task", "language", "status", "lm_eval_task", "primary", "n", "acc", "acc_stderr",
               "acc_norm", "acc_norm_stderr", *CONTINUOUS_COLUMNS, *PAIRED_COLUMNS, "note"]
BPB_COLUMNS = ["bpb", "bpb_sentence", "bpb_sentence_stderr", "base_bpb", "delta_bpb", "delta_bpb_ci_low",
               "delta_bpb_ci_high", "p_bpb"]


def write_csv(result: dict, path: str | Path) -> Path:
    """One row per model x task x language (adapted rows carry their paired comparison with the base), and
    one row per model x language with task "bpb" for bits per byte."""
    pairs = {(c["model"], c["task"], c["language"]): c for c in result["comparisons"]}
    bpb_pairs = {(c["model"], c["language"]): c for c in result.get("bpb_comparisons", [])}
    rows = [{**r, **{k: pairs.get((r["model"], r["task"], r["language"]), {}).get(k) for k in PAIRED_COLUMNS}}
            for r in result["results"]]
    rows += [{**b, "task": "bpb", "status": "ok",
              **{k: bpb_pairs.get((b["model"], b["language"]), {}).get(k) for k in BPB_COLUMNS[3:]}}
             for b in result.get("bpb", [])]
    columns = CSV_COLUMNS + BPB_COLUMNS
    return files.write_csv(path, columns, ([row.get(c) for c in columns] for row in rows))


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(r: dict, m: str) -> str:
    return f"{fmt(r.get(m))} ± {fmt(r.get(f'{m}_stderr'))}"


def _delta(c: dict, m: str, p_key: str) -> list[str]:
    d, p = c.get(f"delta_{m}"), c.get(p_key)
    style = "green" if d and d > 0 and p is not None and p < 0.05 else (
        "red" if d and d < 0 and p is not None and p < 0.05 else "")
    text = "–" if d is None else f"{d:+.3f}"
    if c.get(f"delta_{m}_ci_low") is not None:
        text += f" [{c[f'delta_{m}_ci_low']:+.3f}, {c[f'delta_{m}_ci_high']:+.3f}]"
    return [f"[{style}]{text}[/]" if style else text, fmt(p)]


def benchmark_table(result: dict, model: str):
    """Task x language for one model (and the base beside it): acc, the primary metric, deltas with p."""
    from rich.table import Table

    labels = [m["label"] for m in result["models"]]
    by = {(r["model"], r["task"], r["language"]): r for r in result["results"]}
    pairs = {(c["model"], c["task"], c["language"]): c for c in result["comparisons"]}
    shown = ["base", model] if model != "base" and "base" in labels else [model]
    cfg = result["config"]
    items = f"{cfg['limit']} items per task and language (seeded sample)" if cfg["limit"] else "all items"
    t = Table(title=f"benchmarks: {' vs '.join(shown)}", title_justify="left",
              caption=f"{cfg['shots']}-shot · {items} · mean ± standard error · primary: p_gold_norm (ARC, HellaSwag), "
                      f"p_gold (MMLU) · Δ [95 % paired bootstrap CI], p: bootstrap; Δ acc p: exact McNemar · "
                      f"chance {CHANCE:.2f}")
    for col in ("task", "lang", "n"):
        t.add_column(col, justify="right" if col == "n" else "left")
    for label in shown:
        t.add_column(f"{label} acc", justify="right")
        t.add_column(f"{label} primary", justify="right")
    if len(shown) == 2:
        for col in ("Δ acc", "p", "Δ primary", "p"):
            t.add_column(col, justify="right")
    for task, lang in dict.fromkeys((r["task"], r["language"]) for r in result["results"]):
        first = by.get((shown[0], task, lang))
        if first is None or first["status"] != "ok":
            t.add_row(task, lang, "", "[dim]missing[/]", *([""] * (2 * len(shown) - 1 + 4 * (len(shown) == 2))))
            continue
        primary = first["primary"]
        cells = [task, lang, str(first["n"])]
        for label in shown:
            r = by.get((label, task, lang), {})
            cells += [_cell(r, "acc"), f"{primary} {_cell(r, primary)}"]
        if len(shown) == 2:
            c = pairs.get((model, task, lang), {})
            cells += _delta(c, "acc", "p_mcnemar") + _delta(c, primary, f"p_{primary}")
        t.add_row(*cells)
    return t


def bpb_table(result: dict):
    from rich.table import Table

    pairs = {(c["model"], c["language"]): c for c in result.get("bpb_comparisons", [])}
    cfg = result["config"]["bpb"]
    t = Table(title="bits per byte on held-out parallel sentences (lower is better)", title_justify="left",
              caption=f"corpus {cfg['corpus']} · held-out fraction {cfg['heldout_fraction']} · per-sentence "
                      "mean ± SE · Δ: paired, 95 % bootstrap CI")
    for col in ("model", "lang", "n", "bpb", "per sentence", "Δ vs base", "p"):
        t.add_column(col, justify="left" if col in ("model", "lang") else "right")
    for b in result.get("bpb", []):
        c = pairs.get((b["model"], b["language"]), {})
        t.add_row(b["model"], b["language"], str(b["n"]), fmt(b["bpb"]), _cell(b, "bpb_sentence"),
                  *(_delta(c, "bpb", "p_bpb") if c else ["", ""]))
    return t


def correlation_table(result: dict):
    from rich.table import Table

    t = Table(title="activation gap (gaps.csv, by band) vs performance across languages, English excluded",
              caption="permutation p-values; with about nine languages this is a weak test (|r| > 0.67 for p < 0.05)",
              title_justify="left")
    for col in ("band", "model", "task", "y", "n", "Pearson r", "p", "Spearman ρ", "p"):
        t.add_column(col, justify="left" if col in ("band", "model", "task", "y") else "right")
    for c in result["correlations"]:
        if c["band"] != "all":
            t.add_row(c["band"], c["model"], c["task"], c["y"], str(c["n"]), fmt(c["pearson"]), fmt(c["pearson_p"]),
                      fmt(c["spearman"]), fmt(c["spearman_p"]))
    return t


def tables(result: dict) -> list:
    """Rich tables: benchmarks per adapted model against base, bits per byte, the gap correlations."""
    labels = [m["label"] for m in result["models"]]
    out = [benchmark_table(result, model) for model in ([m for m in labels if m != "base"] or labels)]
    if result.get("bpb"):
        out.append(bpb_table(result))
    if result.get("correlations"):
        out.append(correlation_table(result))
    return out

"""What an evaluation leaves: results.json, results.csv, items.csv, the accuracy figure, and Rich tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from toolkit.evaluation.scoring import Scores
from toolkit.evaluation.tasks import BENCHMARKS, PAIRED_METRICS
from toolkit.files import atomic_write
from toolkit.languages import LANGUAGES

CHANCE = 0.25  # four options (a few ARC items have three or five)


def write_outputs(result: dict, scores: dict[str, dict[tuple[str, str], Scores]], out_dir: Path) -> None:
    """results.json (atomically: it is what later stages and readers trust), results.csv, items.csv, figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", json.dumps(result, indent=1, ensure_ascii=False))
    write_csv(result["results"], result["comparisons"], out_dir / "results.csv")
    with open(out_dir / "items.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "task", "language", "item", *PAIRED_METRICS, "pred", "gold"])
        for label, per_task in scores.items():
            for (task, lang), s in per_task.items():
                for key, values in s.items.items():
                    writer.writerow([label, task, lang, key, *(int(values[m]) for m in PAIRED_METRICS),
                                     values["pred"], values["gold"]])
    figure(result["results"], out_dir / "figures" / "accuracy.png")


def figure(results: list[dict], path: str | Path, metric: str = "acc") -> Path:
    """Accuracy per language, one panel per benchmark, a bar per model with standard-error bars."""
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return Path(path)


CSV_COLUMNS = ["model", "task", "language", "status", "lm_eval_task", "n", "acc", "acc_stderr", "acc_norm",
               "acc_norm_stderr", "base_acc", "delta_acc", "delta_acc_norm", "base_only", "adapted_only",
               "p_mcnemar", "retention_pct", "note"]


def write_csv(results: list[dict], comparisons: list[dict], path: str | Path) -> Path:
    """One row per model x task x language; adapted rows carry their paired comparison with the base."""
    pairs = {(c["model"], c["task"], c["language"]): c for c in comparisons}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            c = pairs.get((r["model"], r["task"], r["language"]), {})
            writer.writerow({**r, **{k: c.get(k) for k in CSV_COLUMNS[10:17]}})
    return Path(path)


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def tables(result: dict) -> list:
    """Rich tables: task x language with base, adapted, delta and p; then the gap correlations."""
    from rich.table import Table

    rows = result["results"]
    labels = [m["label"] for m in result["models"]]
    adapted = [m for m in labels if m != "base"]
    by = {(r["model"], r["task"], r["language"]): r for r in rows}
    pairs = {(c["model"], c["task"], c["language"]): c for c in result["comparisons"]}
    keys = list(dict.fromkeys((r["task"], r["language"]) for r in rows))
    cfg = result["config"]
    items = f"{cfg['limit']} items per task and language (seeded sample)" if cfg["limit"] else "all items"
    caption = (f"{cfg['shots']}-shot · {items} · acc ± standard error · p: exact McNemar on paired items · "
               f"chance {CHANCE:.2f}")
    out = []
    for model in adapted or labels:
        t = Table(title=f"benchmark accuracy: {'base vs ' + model if adapted and 'base' in labels else model}",
                  caption=caption, title_justify="left")
        for col in ("task", "lang", "n"):
            t.add_column(col, justify="right" if col == "n" else "left")
        shown = ["base", model] if adapted and "base" in labels else [model]
        for label in shown:
            t.add_column(f"{label} acc", justify="right")
            t.add_column(f"{label} acc_norm", justify="right")
        if len(shown) == 2:
            for col in ("Δ acc", "p"):
                t.add_column(col, justify="right")
        for task, lang in keys:
            first = by.get((shown[0], task, lang))
            if first is None or first["status"] != "ok":
                t.add_row(task, lang, "", "[dim]missing[/]", *([""] * (2 * len(shown) - 1 + 2 * (len(shown) == 2))))
                continue
            cells = [task, lang, str(first["n"])]
            for label in shown:
                r = by.get((label, task, lang), {})
                cells += [f"{fmt(r.get('acc'))} ± {fmt(r.get('acc_stderr'))}",
                          f"{fmt(r.get('acc_norm'))} ± {fmt(r.get('acc_norm_stderr'))}"]
            if len(shown) == 2:
                c = pairs.get((model, task, lang), {})
                d = c.get("delta_acc")
                style = "green" if d and d > 0 and c.get("p_mcnemar", 1) < 0.05 else (
                    "red" if d and d < 0 and c.get("p_mcnemar", 1) < 0.05 else "")
                cells += [f"[{style}]{d:+.3f}[/]" if style else (f"{d:+.3f}" if d is not None else "–"),
                          fmt(c.get("p_mcnemar"))]
            t.add_row(*cells)
        out.append(t)
    if result.get("correlations"):
        t = Table(title="mean activation gap (gaps.csv) vs accuracy across languages, English excluded",
                  title_justify="left")
        for col in ("model", "task", "y", "n", "Pearson r", "p", "Spearman ρ", "p"):
            t.add_column(col, justify="left" if col in ("model", "task", "y") else "right")
        for c in result["correlations"]:
            t.add_row(c["model"], c["task"], c["y"], str(c["n"]), fmt(c["pearson"]), fmt(c["pearson_p"]),
                      fmt(c["spearman"]), fmt(c["spearman_p"]))
        out.append(t)
    return out

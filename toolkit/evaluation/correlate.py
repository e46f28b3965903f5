"""Gap <-> performance across languages: each band's activation gap against each per-language score.

x: the mean ``gap_pct`` over the layers of a band (early / middle / deep: `analysis.bands.default_bands`
over the layers present in ``RUN/reports/gaps.csv``, read through `analysis.gaps.read_gaps_csv`, one
statistic, default mass) and over all layers ("all"). y: per model and task, a language's mean p_gold,
p_gold_norm, acc, acc_norm, and its bits per byte; per adapted model, the paired deltas. Pearson and
Spearman with seeded permutation p-values (`analysis.stats.correlation`), English excluded (its gap is 0
by definition).

With the paper's ten languages that is nine points: a weak test. |r| must exceed about 0.67 for p < 0.05,
one language can make or break a correlation, and the bands are not independent tests. Read the
coefficients as a description of these languages, not as evidence of a general law.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis.bands import default_bands
from analysis.gaps import read_gaps_csv
from analysis.stats import correlation
from toolkit.files import save_figure
from toolkit.languages import LANGUAGES, REFERENCE

Y_RESULTS = ("p_gold", "p_gold_norm", "acc", "acc_norm")
Y_DELTAS = ("delta_p_gold", "delta_p_gold_norm", "delta_acc")


def band_gaps(path: str | Path, statistic: str | None = None) -> dict[str, dict[str, float]]:
    """band -> language -> mean gap_pct over the band's layers (bands from the layers in the file)."""
    per_layer = read_gaps_csv(path, statistic, REFERENCE)
    layers = sorted({layer for gaps in per_layer.values() for layer in gaps})
    if not layers:
        return {}
    bands = {**default_bands(layers), "all": layers}
    out: dict[str, dict[str, float]] = {}
    for band, members in bands.items():
        for lang, gaps in per_layer.items():
            values = [gaps[layer] for layer in members if layer in gaps]
            if values:
                out.setdefault(band, {})[lang] = float(np.mean(values))
    return out


def correlations(gaps: dict[str, float], values: dict[str, float], seed: int = 0) -> dict:
    """Correlation between a band's gap and a per-language value over the languages that have both."""
    langs = [lang for lang in LANGUAGES if lang in gaps and lang in values and lang != REFERENCE
             and values[lang] is not None and math.isfinite(values[lang])]
    return {"languages": langs, **correlation([gaps[c] for c in langs], [values[c] for c in langs], seed)}


def series(results: list[dict], comparisons: list[dict], bpb: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(model, task, y) -> language -> value, for every y that the run has."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in results:
        if r["status"] == "ok":
            for y in Y_RESULTS:
                if r.get(y) is not None:
                    out.setdefault((r["model"], r["task"], y), {})[r["language"]] = r[y]
    for c in comparisons:
        for y in Y_DELTAS:
            out.setdefault((c["model"], c["task"], y), {})[c["language"]] = c[y]
    for b in bpb:
        if b.get("bpb") is not None:
            out.setdefault((b["model"], "heldout", "bpb"), {})[b["language"]] = b["bpb"]
    return out


def gap_correlations(results: list[dict], comparisons: list[dict], gaps: dict[str, dict[str, float]],
                     bpb: list[dict] | None = None, seed: int = 0) -> list[dict]:
    """One row per band x model x task x y: n, Pearson r and Spearman rho with permutation p-values."""
    rows = []
    for (model, task, y), values in series(results, comparisons, bpb or []).items():
        for band, band_gap in gaps.items():
            rows.append({"band": band, "model": model, "task": task, "x": f"gap_pct ({band})", "y": y,
                         **correlations(band_gap, values, seed)})
    return rows


def figure(correlations_: list[dict], gaps: dict[str, dict[str, float]], results: list[dict], bpb: list[dict],
           path: str | Path, model: str = "base") -> Path | None:
    """Scatter of each band's gap (columns) against p_gold per task and bits per byte (rows), languages labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = series(results, [], bpb)
    ys = [(t, y) for (m, t, y) in data if m == model and y in ("p_gold", "bpb")]
    bands = [b for b in ("early", "middle", "deep") if b in gaps]
    if not ys or not bands:
        return None
    fig = Figure(figsize=(3.4 * len(bands), 2.8 * len(ys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ys), len(bands), squeeze=False)
    stats = {(c["band"], c["task"], c["y"]): c for c in correlations_ if c["model"] == model}
    for i, (task, y) in enumerate(ys):
        for j, band in enumerate(bands):
            ax, values = axes[i, j], data[(model, task, y)]
            langs = [c for c in LANGUAGES if c in values and c in gaps[band] and c != REFERENCE]
            xs, vs = [gaps[band][c] for c in langs], [values[c] for c in langs]
            ax.scatter(xs, vs, s=14)
            for lang, x, v in zip(langs, xs, vs, strict=True):
                ax.annotate(lang, (x, v), fontsize=8, xytext=(3, 2), textcoords="offset points")
            c = stats.get((band, task, y), {})
            rho = c.get("spearman")
            ax.set_title(f"{task} · {band}: ρ={rho:.2f} (p={c.get('spearman_p') or math.nan:.2f}, n={c.get('n', 0)})"
                         if rho is not None else f"{task} · {band}", fontsize=8)
            ax.set_xlabel("gap vs English, %", fontsize=8)
            ax.set_ylabel(y, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)

"""PNG figures of a GapReport: gap heatmap, per-layer gap lines, feature-overlap heatmap.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state), so they render on headless cluster nodes and inside threads.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, TwoSlopeNorm
from matplotlib.figure import Figure

from analysis.report import GROUP_NAME, GapReport
from toolkit.files import save_figure

DPI = 150
_BAND_SHADE = {"early": "#f2f2f2", "middle": "#ffffff", "deep": "#f2f2f2"}


def write_figures(report: GapReport, folder: Path) -> list[Path]:
    """gap_heatmap.png, gap_lines.png and overlap_heatmap.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "gap_heatmap.png": gap_heatmap(report),
        "gap_lines.png": gap_lines(report),
        "overlap_heatmap.png": overlap_heatmap(report),
    }
    if report.instrument is not None and report.instrument.layer_gaps:
        figures["instrument.png"] = instrument_lines(report)
    for name, fig in figures.items():
        FigureCanvasAgg(fig)
        save_figure(fig, folder / name, dpi=DPI, bbox_inches="tight")
    return [folder / name for name in figures]


def gap_heatmap(report: GapReport) -> Figure:
    gaps = report.matrix("gap_pct", report.others)
    limit = _symmetric_limit(gaps)
    fig, ax = _heatmap_axes(report, len(report.others))
    cmap = _with_bad("RdBu")
    image = ax.imshow(gaps, cmap=cmap, norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit), aspect="auto")
    _annotate(ax, gaps, "{:.0f}", lambda v: abs(v) > 0.6 * limit)
    _label_heatmap(ax, report, report.others)
    fig.colorbar(image, ax=ax, label=f"gap vs {report.reference} (%)", shrink=0.9)
    ax.set_title(f"{_stat_name(report)}: gap vs {report.reference} per layer{_model_suffix(report)}", fontsize=10,
                 pad=14)
    return fig


def gap_lines(report: GapReport) -> Figure:
    fig = Figure(figsize=(max(6.5, 0.32 * len(report.layers) + 3.5), 4.2))
    ax = fig.add_subplot()
    x = np.asarray(report.layers)
    _shade_bands(ax, report)
    ax.axhline(0, color="black", linewidth=0.8)
    gaps, low, high = (report.matrix(k, report.others) for k in ("gap_pct", "gap_ci_low", "gap_ci_high"))
    palette = _palette(len(report.others))
    for i, lang in enumerate(report.others):
        style = "-" if lang in report.low_langs else "--"
        ax.plot(x, gaps[i], style, marker="o", markersize=2.5, linewidth=1.3, color=palette[i], label=lang)
        ax.fill_between(x, low[i], high[i], color=palette[i], alpha=0.12, linewidth=0)
    if report.low_langs:
        ax.plot(x, report.group_gap(), color="black", linewidth=2.4, label=f"{GROUP_NAME} mean")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"gap vs {report.reference} (%)")
    ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    ax.set_xticks(x if len(x) <= 30 else x[:: int(np.ceil(len(x) / 30))])
    ax.grid(axis="y", alpha=0.3)
    if report.others:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(
        f"{_stat_name(report)}: gap vs {report.reference} (95 % bootstrap CI){_model_suffix(report)}",
        fontsize=10,
        pad=14,
    )
    return fig


def instrument_lines(report: GapReport) -> Figure:
    """The SAE statistic's gaps beside the residual-norm control's, per layer, one panel each, shared y axis."""
    panel = report.instrument
    measures = [m for m in (panel.statistic, "resid_norm", "position-matched") if m in panel.layer_gaps]
    fig = Figure(figsize=(max(6.5, 0.22 * len(report.layers) + 2.5) * len(measures) / 1.6, 4.2))
    axes = fig.subplots(1, len(measures), sharey=True, squeeze=False)[0]
    x = np.asarray(report.layers)
    names = list(panel.layer_gaps[measures[0]])
    palette = _palette(len(names))
    for ax, measure in zip(axes, measures, strict=True):
        _shade_bands(ax, report)
        ax.axhline(0, color="black", linewidth=0.8)
        for i, name in enumerate(names):
            group = name == GROUP_NAME
            ax.plot(x, panel.layer_gaps[measure][name], "-" if group or name in report.low_langs else "--",
                    color="black" if group else palette[i], linewidth=2.4 if group else 1.1,
                    marker=None if group else "o", markersize=2, label=f"{name} mean" if group else name)
        ax.set_title(measure, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"gap vs {report.reference} (%)")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"instrument check: SAE {panel.statistic} vs SAE-free residual norm{_model_suffix(report)}",
                 fontsize=10)
    return fig


def overlap_heatmap(report: GapReport) -> Figure:
    fig, ax = _heatmap_axes(report, len(report.others))
    jaccard = report.overlap_matrix("jaccard")
    if np.isnan(jaccard).all():
        ax.text(0.5, 0.5, f"no sentences parallel to {report.reference}", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    image = ax.imshow(jaccard, cmap=_with_bad("viridis"), vmin=0, vmax=1, aspect="auto")
    _annotate(ax, jaccard, "{:.2f}", lambda v: v < 0.55)
    _label_heatmap(ax, report, report.others)
    fig.colorbar(image, ax=ax, label="Jaccard of active features", shrink=0.9)
    ax.set_title(f"Active-feature overlap with {report.reference} (parallel sentences){_model_suffix(report)}",
                 fontsize=10, pad=14)
    return fig


def _heatmap_axes(report: GapReport, n_rows: int):
    fig = Figure(figsize=(max(5.0, 0.42 * len(report.layers) + 2.5), max(2.2, 0.42 * n_rows + 1.6)))
    return fig, fig.add_subplot()


def _label_heatmap(ax, report: GapReport, languages: list[str]) -> None:
    ax.set_xticks(range(len(report.layers)), [str(layer) for layer in report.layers], fontsize=7)
    ax.set_yticks(range(len(languages)), languages, fontsize=8)
    for tick, lang in zip(ax.get_yticklabels(), languages, strict=True):
        tick.set_fontweight("bold" if lang in report.low_langs else "normal")
    ax.set_xlabel("layer")
    ax.tick_params(length=0)
    # band boundaries as white gaps, band names above the band
    positions = {layer: j for j, layer in enumerate(report.layers)}
    for name, layers in report.bands.items():
        if layers:
            first, last = positions[layers[0]], positions[layers[-1]]
            if first > 0:
                ax.axvline(first - 0.5, color="white", linewidth=2.5)
            ax.text((first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, color="#444444")


def _annotate(ax, values: np.ndarray, fmt: str, dark) -> None:
    if values.shape[1] > 40:  # too small to read
        return
    size = 6 if values.shape[1] > 18 else 7
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            label = fmt.format(v)
            colour = "white" if dark(v) else "black"
            ax.text(j, i, "0" if label == "-0" else label, ha="center", va="center", fontsize=size, color=colour)


def _shade_bands(ax, report: GapReport) -> None:
    for name, layers in report.bands.items():
        if layers:
            ax.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color=_BAND_SHADE[name], zorder=0)
            ax.text((layers[0] + layers[-1]) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="#444444")


def _with_bad(name: str) -> Colormap:
    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def _palette(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _symmetric_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(max(finite.max(), 1.0)) if finite.size else 1.0


def _stat_name(report: GapReport) -> str:
    return {"mass": "SAE activation mass", "l0": "SAE L0 (active features)", "max": "max SAE activation"}[
        report.statistic
    ]


def _model_suffix(report: GapReport) -> str:
    model = report.meta.get("model_id")
    return f"\n{model}" if model else ""

"""The terminal report (Rich): headline panel, language x layer gap table, per-language summary.

Designed for 80 columns: when there are more layers than fit, consecutive layers of one band are
grouped into a column showing their mean gap (26 layers -> 9 columns of 2-3 layers).
"""

from __future__ import annotations

import math

import numpy as np
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from analysis.bands import compact, describe
from analysis.report import GROUP_NAME, GapReport, Headline
from analysis.stats import nanmean

_LABEL_WIDTH = 7
_CELL_WIDTH = 6  # "-26.3", "+123.4"
_GROUP_LABEL = "med/low"
# RdBu end points and its light centre: red = weaker than the reference, blue = stronger
_RED, _MID, _BLUE = np.array([178, 24, 43]), np.array([247, 247, 247]), np.array([33, 102, 172])


def render(report: GapReport, console: Console) -> None:
    """Print the whole report."""
    model = report.meta.get("model_id") or "unknown model"
    console.print(Rule(f"[bold]lingogap[/bold] · SAE activity vs {report.reference} · {model}"))
    console.print(_context(report), style="dim")
    console.print(headline_panel(report))
    if report.others:
        console.print(gap_table(report, console.width))
        console.print(_gap_legend(report), style="dim")
    console.print(summary_table(report))
    if report.instrument is not None:
        console.print(instrument_table(report))
    for note in report.notes:
        console.print(Text.assemble(("note: ", "yellow"), note))


def headline_panel(report: GapReport) -> Panel:
    """The paper's sentence for the medium/low-resource group (or each language when none is present)."""
    group = report.headline(GROUP_NAME)
    chosen = [group] if group else [h for h in report.headlines if h.name != GROUP_NAME]
    parts: list = []
    for h in chosen:
        name = f"{h.name} ({', '.join(h.languages)})" if h is group else h.name
        parts.append(Text.assemble((name, "bold"), ": ", _headline_sentence(h)))
        parts.append(_headline_detail(h, report.bands))
    weakest = sorted(
        (h for h in report.headlines if h.name != GROUP_NAME and _finite(h.deep_mean_gap) and h.deep_mean_gap < 0),
        key=lambda h: h.deep_mean_gap,
    )[:3]
    if group and weakest:
        listed = ", ".join(f"{h.name} {h.deep_mean_gap:+.1f} %" for h in weakest)
        parts.append(Text(f"largest deep-layer gaps: {listed}"))
    if not parts:
        parts.append(Text(f"only {report.reference} was analysed: no gap to report"))
    panel = report.instrument
    if panel is not None:
        for verdict in panel.verdicts:
            parts.append(Text(verdict, style="bold red" if "DISAGREE" in verdict else ""))
        for sentence in panel.low_fidelity:
            parts.append(Text(sentence, style="yellow"))
        if panel.missing:
            parts.append(Text(panel.missing, style="yellow"))
    return Panel(Group(*parts), title=f"headline · {report.statistic}", title_align="left", border_style="cyan")


def gap_table(report: GapReport, width: int = 80) -> Table:
    """Language x layer-column table of gaps (%), cells coloured red (weaker) to blue (stronger)."""
    max_columns = max(1, (width - _LABEL_WIDTH - (_CELL_WIDTH + 1)) // (_CELL_WIDTH + 1))  # room for "all"
    columns = layer_columns(report.layers, report.bands, max_columns)
    position = {layer: j for j, layer in enumerate(report.layers)}
    gaps = report.matrix("gap_pct", report.others)
    rows = [(lang, gaps[i]) for i, lang in enumerate(report.others)]
    if report.low_langs:
        rows.append((_GROUP_LABEL, report.group_gap()))
    cells = [[nanmean(g[[position[x] for x in layers]]) for _, layers in columns] + [nanmean(g)] for _, g in rows]
    finite = [abs(v) for row in cells for v in row if _finite(v)]
    limit = max([5.0, *finite])

    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False, title=f"gap vs {report.reference} (%)")
    table.add_column("layer", width=_LABEL_WIDTH, no_wrap=True)
    for band, layers in columns:
        label = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        table.add_column(f"{band or ''}\n{label}", justify="right", width=_CELL_WIDTH, no_wrap=True)
    table.add_column("\nall", justify="right", width=_CELL_WIDTH, no_wrap=True, style="bold")
    for k, ((lang, _), values) in enumerate(zip(rows, cells, strict=True)):
        table.add_row(
            Text(lang, style="bold" if lang in report.low_langs or lang == _GROUP_LABEL else ""),
            *(_gap_cell(v, limit) for v in values),
            end_section=bool(report.low_langs) and k == len(rows) - 2,  # rule above the group row
        )
    return table


def _gap_legend(report: GapReport) -> str:
    group = f"; {_GROUP_LABEL} = mean of {', '.join(report.low_langs)}" if report.low_langs else ""
    return (
        f"gap (%) of the mean {report.statistic} vs {report.reference}, negative = weaker; a column of several "
        f"layers shows their mean; all = mean over all layers{group}"
    )


def summary_table(report: GapReport) -> Table:
    """Per language: sentences, mean A over layers, early-band minimum gap, deep-band mean gap with CI, overlap."""
    has_sim = bool(report.similarity)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="per language")
    table.add_column("lang", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column(f"A {report.statistic}", justify="right")
    table.add_column("early min", justify="right", no_wrap=True)
    table.add_column("deep mean [95 % CI]", justify="right", no_wrap=True)
    table.add_column("Jaccard", justify="right")
    if has_sim:
        table.add_column("cosine", justify="right")
    value = report.matrix("value")
    a_mean = nanmean(value, axis=1)
    a_fmt = _decimals_for(a_mean)
    jaccard = report.overlap_matrix("jaccard")
    cosine = _cosine_by_language(report)
    for i, lang in enumerate(report.languages):
        n = next(r.n for r in report.rows if r.language == lang)
        cells: list[Text | str] = [Text(lang, style="bold" if lang in report.low_langs else ""), str(n),
                                   _fmt(a_mean[i], a_fmt)]
        if lang == report.reference:
            cells += [Text("reference", style="dim"), "", "", *([""] if has_sim else [])]
        else:
            j = report.others.index(lang)
            cells += [*_headline_cells(report.headline(lang)), _fmt(nanmean(jaccard[j]), "{:.2f}")]
            if has_sim:
                cells.append(_fmt(cosine.get(lang, math.nan), "{:.2f}"))
        table.add_row(*cells)
    group = report.headline(GROUP_NAME)
    if group:
        table.add_section()
        rest = [_fmt(nanmean(jaccard[[report.others.index(x) for x in report.low_langs]]), "{:.2f}")]
        table.add_row(Text(_GROUP_LABEL, style="bold"), "", "", *_headline_cells(group), *rest,
                      *([""] if has_sim else []))
    return table


def layer_columns(
    layers: list[int], bands: dict[str, list[int]], max_columns: int
) -> list[tuple[str | None, list[int]]]:
    """Split the layers into at most max_columns runs of consecutive layers that never cross a band.

    Returns (band name on the first column of each band, else None; layers of the column).
    """
    band_of = {layer: name for name, members in bands.items() for layer in members}
    segments: list[tuple[str | None, list[int]]] = []
    for layer in layers:
        if segments and segments[-1][0] == band_of.get(layer):
            segments[-1][1].append(layer)
        else:
            segments.append((band_of.get(layer), [layer]))
    size = 1
    while sum(math.ceil(len(seg) / size) for _, seg in segments) > max_columns and size < len(layers):
        size += 1
    columns = []
    for band, seg in segments:
        for k, part in enumerate(np.array_split(seg, math.ceil(len(seg) / size))):
            columns.append((band if k == 0 else None, [int(x) for x in part]))
    return columns


def _context(report: GapReport) -> str:
    saes = report.meta.get("sae_source") or "unknown SAEs"
    n_layers = len(report.layers)
    return (
        f"statistic {report.statistic} · SAEs {saes} · {n_layers} layer{'s' if n_layers != 1 else ''} · "
        f"{report.n_boot} bootstrap resamples (seed {report.seed})\nbands: {describe(report.bands)}"
    )


_MEASURE_LABEL = {"position-matched": "pos-matched"}
_MARK = {"agrees": ("✓", "green"), "disagrees": ("✗", "bold red"), "unclear": ("?", "dim"), "": ("", "")}


def instrument_table(report: GapReport) -> Table:
    """Per language and band: the SAE gap beside its controls (CI, agreement) and the SAEs' FVE for it."""
    panel = report.instrument
    bands = [b for b in report.bands if report.bands[b]]
    table = Table(title=f"instrument check · gap % vs {report.reference} [95 % CI] · ✓ agrees ✗ disagrees with "
                        f"{panel.statistic}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("language")
    table.add_column("measure")
    for band in bands:
        table.add_column(band, justify="right")
    if panel.missing:
        table.add_row("—", panel.missing, *[""] * len(bands))
        return table
    if report.reference in panel.band_fve:
        ref_fve = [_fve_cell(panel, report.reference, report.reference, b) for b in bands]
        table.add_row(report.reference, "FVE", *ref_fve, end_section=True)
    names = list(dict.fromkeys(r.language for r in panel.rows))
    names = [n for n in names if n == GROUP_NAME] + [n for n in names if n != GROUP_NAME]
    measures = list(dict.fromkeys(r.measure for r in panel.rows))
    for k, name in enumerate(names):
        for j, measure in enumerate(measures):
            cells = []
            for band in bands:
                r = panel.row(name, band, measure)
                mark, style = _MARK[r.agrees] if r else ("", "")
                cells.append(Text.assemble(_instrument_cell(r), (mark, style)) if r else Text("—"))
            label = _GROUP_LABEL if name == GROUP_NAME else name
            table.add_row(label if j == 0 else "", _MEASURE_LABEL.get(measure, measure), *cells)
        if name in panel.band_fve:
            table.add_row("", "FVE", *[_fve_cell(panel, name, report.reference, b) for b in bands],
                          end_section=k < len(names) - 1)
        elif k < len(names) - 1:
            table.rows[-1].end_section = True
    return table


def _instrument_cell(r) -> str:
    if not _finite(r.gap_pct):
        return "—"
    ci = f" [{r.ci_low:+.0f},{r.ci_high:+.0f}]" if _finite(r.ci_low) and _finite(r.ci_high) else ""
    return f"{r.gap_pct:+.0f}{ci}"


def _fve_cell(panel, name: str, reference: str, band: str) -> Text:
    value = panel.band_fve[name].get(band, float("nan"))
    ref = panel.band_fve.get(reference, {}).get(band, float("nan"))
    low = _finite(value) and _finite(ref) and value < ref - 0.1
    return Text("—" if not _finite(value) else f"{value:.2f}", style="yellow" if low else "")


def _headline_sentence(h: Headline) -> Text:
    if not _finite(h.early_min_gap):
        early = Text("no early-layer gap")
    elif h.early_min_gap < 0:
        early = Text.assemble("up to ", (f"{-h.early_min_gap:.2f} % lower", "bold red"), " in early layers")
    else:
        smallest = (f"{h.early_min_gap:+.2f} %", "bold blue")
        early = Text.assemble("never lower in early layers (smallest gap ", smallest, ")")
    if not _finite(h.deep_mean_gap):
        deep = Text("no deep-layer gap")
    else:
        word, style = ("lower", "bold red") if h.deep_mean_gap < 0 else ("higher", "bold blue")
        deep = Text.assemble((f"{abs(h.deep_mean_gap):.2f} % {word}", style), " in deep layers")
    return Text.assemble(early, ", ", deep)


def _headline_detail(h: Headline, bands: dict[str, list[int]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    where = f"layer {h.early_min_layer}" if h.early_min_layer is not None else "—"
    grid.add_row("  early", "min", _signed(h.early_min_gap), where, f"95 % CI [{_ci(h.early_ci)}]", style="dim")
    deep = f"layer{'s' if len(bands['deep']) > 1 else ''} {compact(bands['deep'])}"
    grid.add_row("  deep", "mean", _signed(h.deep_mean_gap), deep, f"95 % CI [{_ci(h.deep_ci)}]", style="dim")
    return grid


def _headline_cells(h: Headline | None) -> list[Text]:
    if h is None:
        return [Text(""), Text("")]
    layer = f" (L{h.early_min_layer})" if h.early_min_layer is not None else ""
    early = Text.assemble(_signed(h.early_min_gap), layer)
    deep = Text.assemble(_signed(h.deep_mean_gap), f" [{_ci(h.deep_ci)}]")
    return [early, deep]


def _signed(v: float) -> Text:
    if not _finite(v):
        return Text("—", style="dim")
    return Text(f"{v:+.1f}", style="red" if v < 0 else "blue")


def _gap_cell(v: float, limit: float) -> Text:
    if not _finite(v):
        return Text("—", style="dim")
    t = max(-1.0, min(1.0, v / limit))
    rgb = (_MID + abs(t) * ((_RED if t < 0 else _BLUE) - _MID)).round().astype(int)
    fg = "white" if abs(t) > 0.55 else "black"
    return Text(f"{v:+.1f}", style=f"{fg} on rgb({rgb[0]},{rgb[1]},{rgb[2]})")


def _ci(ci: tuple[float, float]) -> str:
    return ", ".join("—" if not _finite(v) else f"{v:+.1f}" for v in ci)


def _decimals_for(values: np.ndarray) -> str:
    """A format that gives the largest finite value four significant digits, the same decimals for all."""
    finite = np.abs(values[np.isfinite(values)])
    top = finite.max() if finite.size and finite.max() > 0 else 1.0
    return f"{{:.{max(0, 3 - math.floor(math.log10(top)))}f}}"


def _fmt(v: float, fmt: str) -> str:
    return fmt.format(v) if _finite(v) else "—"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _cosine_by_language(report: GapReport) -> dict[str, float]:
    """Mean cosine similarity over layers, for the languages whose residuals were saved."""
    out: dict[str, list[float]] = {}
    for r in report.similarity:
        out.setdefault(r.language, []).append(r.cosine)
    return {lang: float(nanmean(v)) for lang, v in out.items()}

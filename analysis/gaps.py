"""Per-language x per-layer SAE activity, its gap to English, and the paper's headline numbers.

    python -m analysis.gaps PATH... [--out DIR] [--stat mass|l0|max] [--bands 0-8,9-17,18-25]
                            [--n-boot 1000] [--seed 0] [--reference en] [--low-langs id,ca,mr,ml,hi]

PATH: activation files (.h5) or run directories (RUN/activations/*.h5). Writes gaps.json,
gaps.csv, figures/*.png and report.txt into --out (RUN/reports/ by default) and prints the report.
How each number is computed is spelled out in analysis.report.METHODS (and in gaps.json).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from analysis.arithmetic import gap_pct
from analysis.bands import compact, parse_bands
from analysis.figures import write_figures
from analysis.instrument import PanelSpec, build_panel, require_stat
from analysis.overlap import active_keys, feature_overlap, mean_cosine, pair_keys
from analysis.report import GROUP_NAME, GapReport, GapRow, Headline, OverlapRow, SimilarityRow, write_csv, write_json
from analysis.sources import LanguageSource, check_parallel, load_sources, resolve_paths
from analysis.stats import cluster_bootstrap_means, nanmean, percentile_ci, quiet_nan, wilcoxon
from analysis.terminal import render
from toolkit.errors import UserError
from toolkit.files import atomic_write
from toolkit.languages import REFERENCE
from toolkit.rundir import ReportFolder, RunDir
from toolkit.store import SAE_STATS, STATS

LOW_LANGS = ("id", "ca", "mr", "ml", "hi")
REPORT_WIDTH = 80  # report.txt is the terminal report at the width it is designed for

Pathish = str | Path


@dataclass(frozen=True)
class GapOptions:
    """How activation files are analysed: the per-sentence statistic, the layer bands (default: thirds), the
    bootstrap's resamples and seed, the reference language, the headline group (a list or "id,ca,mr"), and
    whether languages whose sentence ids differ are analysed on the ids they share."""

    stat: str = "mass"
    bands: str | Sequence[tuple[int, int]] | None = None
    n_boot: int = 1000
    seed: int = 0
    reference: str = REFERENCE
    low_langs: Sequence[str] | str = LOW_LANGS
    allow_id_mismatch: bool = False


@dataclass
class _Measured:
    """The per-language arrays every table of a report is made from."""

    stat: str
    reference: str
    layers: list[int]
    values: dict[str, np.ndarray]  # (sentences, layers): the statistic per sentence
    reps: dict[str, np.ndarray]  # bootstrap replicates of the layer means
    gaps: dict[str, np.ndarray]  # gap_pct per layer
    gap_reps: dict[str, np.ndarray]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # rows of the sentences shared with the reference


def analyse(paths: Pathish | Sequence[Pathish], options: GapOptions = GapOptions()) -> GapReport:
    """Analyse activation files (or run directories) into a GapReport; see analysis.report.METHODS.

    Every language must hold the reference's sentence ids (the pairing each gap rests on); with
    `options.allow_id_mismatch` the parallel statistics use the ids both hold, and a note says how many."""
    stat, n_boot, seed, reference, low_langs = (options.stat, options.n_boot, options.seed, options.reference,
                                               options.low_langs)
    if stat not in STATS:
        raise UserError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    if n_boot < 1:
        raise UserError(f"n_boot must be at least 1 (got {n_boot}); 1000 or more for publishable intervals")
    if isinstance(low_langs, str):  # "id,ca,mr" from a config file
        low_langs = [x.strip() for x in low_langs.split(",") if x.strip()]
    sources, meta = load_sources(resolve_paths([paths] if isinstance(paths, (str, Path)) else paths), reference)
    if not options.allow_id_mismatch:
        check_parallel(sources, reference)
    layers = meta["layers"]
    band_layers = parse_bands(options.bands, layers)
    languages = _order(sources, reference, low_langs)
    group = [lang for lang in low_langs if lang in sources and lang != reference]

    if stat not in SAE_STATS:
        require_stat(sources, layers, stat)
    values = {lang: sources[lang].stats(layers, stat) for lang in languages}
    units = np.unique(np.concatenate([s.ids for s in sources.values()]))
    groups = {lang: (np.searchsorted(units, sources[lang].ids), values[lang]) for lang in languages}
    reps = cluster_bootstrap_means(groups, len(units), n_boot, seed)
    ref_a = values[reference].mean(axis=0)
    gaps = {lang: gap_pct(values[lang].mean(axis=0), ref_a) for lang in languages}
    gap_reps = {lang: gap_pct(reps[lang], reps[reference]) for lang in languages}
    pairs = {lang: _pairs(sources[lang], sources[reference]) for lang in languages}
    measured = _Measured(stat, reference, layers, values, reps, gaps, gap_reps, pairs)

    rows = [row for lang in languages for row in _rows(measured, lang)]
    headlines = [_headline(lang, [lang], gaps[lang], gap_reps[lang], layers, band_layers) for lang in languages[1:]]
    if group:
        group_gap = nanmean([gaps[lang] for lang in group], axis=0)
        group_reps = nanmean([gap_reps[lang] for lang in group], axis=0)
        headlines.insert(0, _headline(GROUP_NAME, group, group_gap, group_reps, layers, band_layers))
    overlap, similarity = _compare(sources, languages, reference, layers, pairs)
    panel = build_panel(sources, PanelSpec(reference, languages, group, GROUP_NAME, layers, band_layers, stat,
                                           n_boot, seed))
    return GapReport(
        statistic=stat,
        reference=reference,
        languages=languages,
        low_langs=group,
        layers=layers,
        bands=band_layers,
        n_boot=n_boot,
        seed=seed,
        rows=rows,
        headlines=headlines,
        overlap=overlap,
        similarity=similarity,
        meta=meta,
        sources={lang: [str(p) for p in sources[lang].paths] for lang in languages},
        notes=_notes(sources, languages, measured, low_langs) + truncation_notes(sources),
        instrument=panel,
    )


def write_report(report: GapReport, out_dir: Pathish) -> Path:
    """Write gaps.json, gaps.csv, figures/*.png and report.txt into out_dir; returns out_dir."""
    out = ReportFolder(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    write_json(report, out.gaps_json)
    write_csv(report, out.gaps_csv)
    write_figures(report, out.figures)
    console = Console(record=True, width=REPORT_WIDTH, file=io.StringIO())
    render(report, console)
    atomic_write(out.report_text, console.export_text())
    return out.root


def run_report(run_dir: Pathish, options: GapOptions = GapOptions(), out_dir: Pathish | None = None,
               console: Console | None = None) -> GapReport:
    """The `report` stage: analyse RUN/activations, write RUN/reports/ (or out_dir), print to `console` if given."""
    report = analyse(run_dir, options)
    write_report(report, out_dir if out_dir is not None else RunDir(run_dir).reports)
    if console is not None:
        render(report, console)
    return report


def _order(sources: dict[str, LanguageSource], reference: str, low_langs: Sequence[str]) -> list[str]:
    others = sorted(lang for lang in sources if lang != reference and lang not in low_langs)
    return [reference, *others, *(lang for lang in low_langs if lang in sources and lang != reference)]


def read_gaps_csv(path: Pathish, statistic: str | None = None,
                  reference: str = REFERENCE) -> dict[str, dict[int, float]]:
    """gap_pct per language and layer from a tidy gaps.csv written by `report` (reference excluded).

    With several statistics in the file, `statistic` picks one (default: "mass" when present, else the
    only one there). Blank or non-finite gaps are left out."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read the gaps table ({exc}); rerun `report`") from None
    missing = {"language", "layer", "gap_pct"} - set(rows[0] if rows else {})
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(sorted(missing))}; expected a gaps.csv from `report`")
    stats = {r.get("statistic", "") for r in rows}
    if len(stats) > 1 or statistic is not None:
        chosen = statistic or ("mass" if "mass" in stats else None)
        if chosen not in stats:
            raise UserError(f"{path} holds statistic(s) {', '.join(sorted(stats))}; choose one of them")
        rows = [r for r in rows if r.get("statistic") == chosen]
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        try:
            value, layer = float(r["gap_pct"]), int(r["layer"])
        except ValueError:
            continue
        if r["language"] != reference and np.isfinite(value):
            out.setdefault(r["language"], {})[layer] = value
    return out


def language_gaps(
    paths: Pathish | Sequence[Pathish], lang: str, layers: Sequence[int], stat: str = "mass",
    ids: Sequence[str] | None = None, reference: str = REFERENCE,
) -> dict[int, float] | None:
    """gap_pct per layer of `lang` straight from activation files: A = mean per-sentence statistic over the
    sentences both languages have (restricted to `ids` when given). None when a language, a layer or
    enough shared sentences (2) are missing."""
    try:
        sources, _ = load_sources(resolve_paths([paths] if isinstance(paths, (str, Path)) else paths), reference)
    except UserError:
        return None
    if lang not in sources or reference not in sources:
        return None
    src, ref = sources[lang], sources[reference]
    try:
        a, b = src.stats(list(layers), stat), ref.stats(list(layers), stat)
    except (UserError, KeyError):
        return None
    rows_lang, rows_ref = _pairs(src, ref)
    if ids is not None:
        keep = np.isin(src.ids[rows_lang], np.asarray(list(ids), dtype=src.ids.dtype))
        rows_lang, rows_ref = rows_lang[keep], rows_ref[keep]
    if len(rows_lang) < 2:
        return None
    gaps = gap_pct(a[rows_lang].mean(axis=0), b[rows_ref].mean(axis=0))
    return {int(layer): float(g) for layer, g in zip(layers, gaps, strict=True)}


def _pairs(lang: LanguageSource, ref: LanguageSource) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the sentences both languages have (same id), in the language and in the reference."""
    _, rows_lang, rows_ref = np.intersect1d(lang.ids, ref.ids, assume_unique=True, return_indices=True)
    return rows_lang, rows_ref


def _rows(m: _Measured, lang: str) -> list[GapRow]:
    stat, layers, values, ref_values, gap = m.stat, m.layers, m.values[lang], m.values[m.reference], m.gaps[lang]
    pairs, is_reference = m.pairs[lang], lang == m.reference
    low, high = percentile_ci(m.reps[lang])
    gap_low, gap_high = percentile_ci(m.gap_reps[lang])
    x, y = values[pairs[0]], ref_values[pairs[1]]
    n_par = len(pairs[0])
    gap_par = gap_pct(x.mean(axis=0), y.mean(axis=0)) if n_par else np.full(len(layers), np.nan)
    return [
        GapRow(
            language=lang,
            layer=layer,
            statistic=stat,
            value=float(values[:, j].mean()),
            ci_low=float(low[j]),
            ci_high=float(high[j]),
            gap_pct=float(gap[j]),
            gap_parallel_pct=float(gap_par[j]),
            p_value=np.nan if is_reference else wilcoxon(x[:, j], y[:, j]),
            n=len(values),
            gap_ci_low=float(gap_low[j]),
            gap_ci_high=float(gap_high[j]),
            n_parallel=n_par,
        )
        for j, layer in enumerate(layers)
    ]


def _headline(
    name: str, languages: list[str], gap: np.ndarray, reps: np.ndarray, layers: list[int], bands: dict[str, list[int]]
) -> Headline:
    early = [layers.index(layer) for layer in bands["early"]]
    deep = [layers.index(layer) for layer in bands["deep"]]
    with quiet_nan():  # all-NaN bands stay NaN
        if np.isnan(gap[early]).all():
            early_min, early_layer = np.nan, None
        else:
            i = int(np.nanargmin(gap[early]))
            early_min, early_layer = float(gap[early][i]), bands["early"][i]
        early_ci = percentile_ci(np.nanmin(reps[:, early], axis=1))
        deep_mean = float(np.nanmean(gap[deep]))
        deep_ci = percentile_ci(np.nanmean(reps[:, deep], axis=1))
    return Headline(
        name=name,
        languages=languages,
        early_min_gap=early_min,
        early_min_layer=early_layer,
        early_ci=(float(early_ci[0]), float(early_ci[1])),
        deep_mean_gap=deep_mean,
        deep_ci=(float(deep_ci[0]), float(deep_ci[1])),
    )


def _compare(
    sources: dict[str, LanguageSource],
    languages: list[str],
    reference: str,
    layers: list[int],
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[list[OverlapRow], list[SimilarityRow]]:
    """Feature overlap and residual similarity with the reference, one layer's codes in memory at a time."""
    ref = sources[reference]
    others = [lang for lang in languages if lang != reference]
    pair_of_row = {}
    for lang in others:
        rows_lang, rows_ref = pairs[lang]
        pair_of_row[lang] = (_pair_index(sources[lang].n, rows_lang), _pair_index(ref.n, rows_ref))
    overlap, similarity = [], []
    for layer in layers:
        ref_keys = active_keys(*ref.codes(layer))
        ref_pooled = ref.pooled_resid(layer) if ref.has_resid(layer) else None
        for lang in others:
            rows_lang, rows_ref = pairs[lang]
            if len(rows_lang) == 0:
                overlap.append(OverlapRow(lang, layer, np.nan, np.nan, 0))
                continue
            keys = pair_keys(active_keys(*sources[lang].codes(layer)), pair_of_row[lang][0])
            matched = pair_keys(ref_keys, pair_of_row[lang][1])
            overlap.append(OverlapRow(lang, layer, *feature_overlap(keys, matched, len(rows_lang)), len(rows_lang)))
            if ref_pooled is not None and sources[lang].has_resid(layer):
                cosine = mean_cosine(sources[lang].pooled_resid(layer)[rows_lang], ref_pooled[rows_ref])
                similarity.append(SimilarityRow(lang, layer, cosine, len(rows_lang)))
    return overlap, similarity


def _pair_index(n: int, rows: np.ndarray) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = np.arange(len(rows))
    return out


def _notes(sources: dict[str, LanguageSource], languages: list[str], m: _Measured, low_langs: Sequence[str]
           ) -> list[str]:
    """What a reader must know to trust the numbers: unmatched sentences, absent languages, undefined gaps."""
    reference, pairs, layers, stat = m.reference, m.pairs, m.layers, m.stat
    ref_a = m.values[reference].mean(axis=0)
    notes = []
    ref = sources[reference]
    for lang in languages[1:]:
        n_par = len(pairs[lang][0])
        if n_par == 0:
            notes.append(
                f"{lang} shares no sentence id with {reference}: parallel gaps, p-values and overlap are undefined"
            )
        elif n_par < sources[lang].n or n_par < ref.n:
            notes.append(
                f"{lang}: {n_par} parallel sentences; {sources[lang].n - n_par} of its {sources[lang].n} and "
                f"{ref.n - n_par} of {reference}'s {ref.n} have no counterpart (left out of the parallel statistics)"
            )
    absent = [lang for lang in low_langs if lang not in sources]
    if absent:
        notes.append(f"{GROUP_NAME} headline without {', '.join(absent)} (no activation files)")
    dead = [layer for layer, a in zip(layers, ref_a, strict=True) if a == 0]
    if dead:
        notes.append(f"{reference} has zero mean {stat} at layer(s) {compact(dead)}: gaps are undefined there")
    return notes


def truncation_notes(sources: dict[str, LanguageSource], warn_share: float = 0.01) -> list[str]:
    """A note per language whose extraction cut more than `warn_share` of its sentences at max_length."""
    notes = []
    for lang, src in sources.items():
        cut = [_with_attrs(p).get("n_truncated") for p in src.paths]
        if any(c is None for c in cut):
            continue  # files from before truncation was counted
        if sum(cut) > warn_share * src.n:
            notes.append(f"{lang}: {sum(cut)} of {src.n} sentences were cut at max_length; their tail tokens are "
                         "missing from every statistic: rerun extract with a larger --max-length and --overwrite")
    return notes


def _with_attrs(path: Path) -> dict:
    from toolkit.store import ActivationFile

    with ActivationFile(path) as f:
        return f.attrs


def _default_out(paths: Sequence[str]) -> Path:
    return RunDir.holding(paths[0]).reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.gaps",
        description="Per-language x per-layer SAE activity gaps vs the reference language, with CIs, "
        "Wilcoxon tests, feature overlap, figures and a terminal report.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="activation files (.h5) or run directories")
    parser.add_argument("--out", help="output folder (default: RUN/reports of the first PATH)")
    parser.add_argument("--stat", choices=STATS, default="mass", help="per-sentence statistic (default: mass)")
    parser.add_argument("--bands", help="early,middle,deep layer ranges, e.g. 0-8,9-17,18-25 (default: thirds)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--reference", default="en", help="reference language (default: en)")
    parser.add_argument("--low-langs", default=",".join(LOW_LANGS), help="the headline group (default: %(default)s)")
    parser.add_argument("--allow-id-mismatch", action="store_true",
                        help="when the languages' sentence ids differ, analyse only the ids they share")
    args = parser.parse_args(argv)
    console = Console()
    try:
        report = analyse(args.paths, GapOptions(stat=args.stat, bands=args.bands, n_boot=args.n_boot, seed=args.seed,
                                                reference=args.reference, low_langs=args.low_langs,
                                                allow_id_mismatch=args.allow_id_mismatch))
        out = write_report(report, args.out or _default_out(args.paths))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    render(report, console)
    console.print(f"[dim]wrote gaps.json, gaps.csv, report.txt and figures/ to {out}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

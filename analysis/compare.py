"""Run-vs-run comparison: does a gap survive another SAE seed, width, training mix, dtype or corpus?

    python -m analysis.compare RUN_A RUN_B [RUN_C ...] [--out DIR] [--stat mass] [--bands 0-5,6-11,12-17]

Reads each run's `reports/gaps.json` (written by `report`) and, on the languages and layers every run
has, prints per language and band each run's gap with its CI and whether the runs agree in sign, then
the correlation of the per-layer gap profiles between runs. Writes `compare.json` and `compare.png`
in --out. Languages and layers that not every run has are listed as skipped. Torch-free.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from analysis.bands import compact, describe, parse_bands
from toolkit.errors import UserError
from toolkit.files import jsonable, save_figure, write_json
from toolkit.rundir import CompareFolder, ReportFolder, RunDir

GROUP = "medium/low-resource"
MIN_PROFILE_LAYERS = 3  # a correlation over fewer layers says nothing
METHOD = ("band gap: mean of gap_pct over the band's shared layers; its CI: the mean of the per-layer CI "
          "bounds (at least as wide as the CI of the mean, since gaps.json keeps no bootstrap replicates). "
          f"{GROUP}: unweighted mean over the group's languages present in every run. agree: every run's gap has "
          "the same sign; robust: and every CI excludes 0. profile r: Pearson correlation over shared layers.")


@dataclass
class Run:
    name: str
    path: str
    statistic: str
    sae_source: str
    languages: list[str]
    low_langs: list[str]
    layers: list[int]
    gaps: dict[str, dict[int, tuple[float, float, float]]]  # language -> layer -> (gap, ci_low, ci_high)
    headlines: dict[str, dict[str, tuple[float, float, float]]]  # name -> measure -> (gap, ci_low, ci_high)
    bands: dict[str, list[int]]


@dataclass
class BandGap:
    run: str
    gap: float
    ci_low: float
    ci_high: float


@dataclass
class BandRow:
    language: str
    band: str
    gaps: list[BandGap]
    agree: bool
    robust: bool


@dataclass
class HeadlineRow:
    name: str  # a language or the group
    measure: str  # early_min_gap or deep_mean_gap
    gaps: list[BandGap]
    agree: bool
    robust: bool


@dataclass
class ProfileRow:
    language: str
    run_a: str
    run_b: str
    pearson: float
    n_layers: int


def load_run(path: str | Path, stat: str | None = None, name: str | None = None) -> Run:
    """One run's gaps from RUN/reports/gaps.json (or a gaps.json path), for one statistic."""
    path = Path(path)
    file = path if path.suffix == ".json" else RunDir(path).gaps_json
    if not file.is_file():
        raise UserError(f"{file}: no gap report; run `python -m toolkit.submit report --run {path}` first")
    body = json.loads(file.read_text())
    meta = body.get("metadata", {})
    stat = stat or meta.get("statistic")
    gaps: dict[str, dict[int, tuple[float, float, float]]] = {}
    for r in body.get("rows", []):
        if r["statistic"] == stat and r["language"] != meta.get("reference", "en"):
            gaps.setdefault(r["language"], {})[int(r["layer"])] = (
                _num(r["gap_pct"]), _num(r["gap_ci_low"]), _num(r["gap_ci_high"]))
    if not gaps:
        raise UserError(f"{file} has no gap rows for statistic {stat!r}")
    model = meta.get("model", {})
    return Run(name or (path.name if path.suffix != ".json" else path.parent.parent.name), str(path), stat,
               str(model.get("sae_source", "")), sorted(gaps), list(meta.get("low_langs", [])),
               sorted(int(x) for x in meta.get("layers", [])), gaps, _headlines(body, stat),
               {k: list(v) for k, v in meta.get("bands", {}).items()})


def _headlines(body: dict, stat: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """The report's own headline numbers (on its own bands); only for the statistic it was made with."""
    if body.get("metadata", {}).get("statistic") != stat:
        return {}
    return {h["name"]: {"early_min_gap": (_num(h["early_min_gap"]), *map(_num, h["early_ci"])),
                        "deep_mean_gap": (_num(h["deep_mean_gap"]), *map(_num, h["deep_ci"]))}
            for h in body.get("headlines", [])}


def _num(value) -> float:
    return math.nan if value is None else float(value)


@dataclass
class Comparison:
    runs: list[Run]
    languages: list[str]
    layers: list[int]
    bands: dict[str, list[int]]
    rows: list[BandRow]
    profiles: list[ProfileRow]
    skipped: dict[str, dict[str, list]]
    headlines: list[HeadlineRow]

    def to_json(self) -> dict:
        runs = [{"name": r.name, "path": r.path, "statistic": r.statistic, "sae_source": r.sae_source,
                 "languages": r.languages, "layers": r.layers} for r in self.runs]
        return jsonable({"format": "lingogap-compare", "version": 1, "runs": runs, "languages": self.languages,
                        "layers": self.layers, "bands": self.bands, "skipped": self.skipped, "method": METHOD,
                        "rows": [asdict(r) for r in self.rows], "headlines": [asdict(h) for h in self.headlines],
                        "profiles": [asdict(p) for p in self.profiles]})


def compare(runs: list[Run], bands: str | None = None) -> Comparison:
    """Band gaps, sign agreement and profile correlations on what every run shares."""
    if len(runs) < 2:
        raise UserError("compare needs at least two runs")
    _unique_names(runs)
    languages = sorted(set.intersection(*(set(r.languages) for r in runs)))
    layers = sorted(set.intersection(*(set(r.layers) for r in runs)))
    if not languages or not layers:
        raise UserError("the runs share no " + ("language" if not languages else "layer") + " to compare")
    skipped = {r.name: {"languages": sorted(set(r.languages) - set(languages)),
                        "layers": sorted(set(r.layers) - set(layers))} for r in runs}
    group = [lang for lang in languages if all(lang in r.low_langs for r in runs)]
    profiles = {r.name: _profiles(r, languages, group, layers) for r in runs}
    chosen = parse_bands(bands, layers)
    names = languages + ([GROUP] if group else [])
    rows = [_band_row(runs, profiles, lang, band, idx) for lang in names
            for band, idx in ((b, [layers.index(x) for x in ls]) for b, ls in chosen.items()) if idx]
    pairs = [_profile_row(lang, a, b, profiles) for lang in names for a, b in itertools.combinations(runs, 2)]
    return Comparison(runs, languages, layers, chosen, rows, pairs, skipped, _headline_rows(runs))


def _unique_names(runs: list[Run]) -> None:
    if len({r.name for r in runs}) < len(runs):
        for i, r in enumerate(runs, 1):
            r.name = f"{i}:{r.name}"


def _profiles(run: Run, languages: list[str], group: list[str], layers: list[int]) -> dict[str, np.ndarray]:
    """language -> (3, layers) array of gap, ci_low, ci_high; the group is the mean over its languages."""
    nan = (math.nan,) * 3
    out = {lang: np.array([run.gaps[lang].get(layer, nan) for layer in layers]).T for lang in languages}
    if group:
        out[GROUP] = np.nanmean(np.stack([out[lang] for lang in group]), axis=0)
    return out


def _band_row(runs: list[Run], profiles: dict, lang: str, band: str, idx: list[int]) -> BandRow:
    gaps = [BandGap(r.name, *(float(np.nanmean(profiles[r.name][lang][k, idx])) for k in range(3))) for r in runs]
    return BandRow(lang, band, gaps, *_agreement(gaps))


def _agreement(gaps: list[BandGap]) -> tuple[bool, bool]:
    signs = {math.copysign(1, g.gap) for g in gaps if math.isfinite(g.gap) and g.gap != 0}
    agree = len(signs) == 1 and all(math.isfinite(g.gap) for g in gaps)
    return agree, agree and all(g.ci_low > 0 or g.ci_high < 0 for g in gaps)


def _headline_rows(runs: list[Run]) -> list[HeadlineRow]:
    """Each report's early-min and deep-mean gaps with their bootstrap CIs, for names every run has."""
    names = [n for n in runs[0].headlines if all(n in r.headlines for r in runs)]
    out = []
    for name, measure in itertools.product(names, ("early_min_gap", "deep_mean_gap")):
        gaps = [BandGap(r.name, *r.headlines[name][measure]) for r in runs]
        out.append(HeadlineRow(name, measure, gaps, *_agreement(gaps)))
    return out


def _profile_row(lang: str, a: Run, b: Run, profiles: dict) -> ProfileRow:
    x, y = profiles[a.name][lang][0], profiles[b.name][lang][0]
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    r = math.nan
    if n >= MIN_PROFILE_LAYERS and np.std(x[ok]) > 0 and np.std(y[ok]) > 0:
        r = float(np.corrcoef(x[ok], y[ok])[0, 1])
    return ProfileRow(lang, a.name, b.name, r, n)



def mark(row: BandRow | HeadlineRow) -> str:
    return "✓ robust" if row.robust else ("✓" if row.agree else "✗ differ")


def render(comparison: Comparison, console: Console) -> None:
    c = comparison
    stats = sorted({r.statistic for r in c.runs})
    console.print(f"[bold]Comparing {len(c.runs)} runs[/] · statistic {', '.join(stats)} · "
                  f"{len(c.languages)} shared languages · layers {compact(c.layers)} · {describe(c.bands)}")
    for r in c.runs:
        console.print(f"  {r.name}: {r.path} · SAEs {r.sae_source or 'unknown'}")
    for name, what in c.skipped.items():
        parts = [f"{k} {', '.join(map(str, v)) if k == 'languages' else compact(v)}" for k, v in what.items() if v]
        if parts:
            console.print(f"  [yellow]skipped[/] (only in {name}): {'; '.join(parts)}")
    console.print(_gap_table("gap % per language and band: each run's gap [95 % CI]", ("language", "band"), c.runs,
                             [((row.language, row.band), row) for row in c.rows]))
    _render_headlines(c, console)
    _render_profiles(c, console)
    if len(stats) > 1:
        console.print(f"[yellow]note:[/] the runs use different statistics ({', '.join(stats)})")


def _render_headlines(c: Comparison, console: Console) -> None:
    if not c.headlines:
        return
    same = all(r.bands == c.runs[0].bands for r in c.runs)
    title = "headlines as each report made them (bootstrap CIs)" + ("" if same else ", on DIFFERENT bands")
    rows = [((row.name, row.measure), row) for row in c.headlines]
    console.print(_gap_table(title, ("name", "measure"), c.runs, rows))


def _gap_table(title: str, labels: tuple[str, str], runs: list[Run], rows: list[tuple[tuple[str, str], object]]
               ) -> Table:
    """Labelled rows, one gap [CI] column per run and the sign-agreement mark."""
    table = Table(title=title)
    for column in (*labels, *(r.name for r in runs), "sign"):
        table.add_column(column, justify="left" if column in labels else "right")
    for label, row in rows:
        cells = [f"{g.gap:+.1f} [{g.ci_low:+.1f}, {g.ci_high:+.1f}]" for g in row.gaps]
        table.add_row(*label, *cells, mark(row))
    return table


def _render_profiles(c: Comparison, console: Console) -> None:
    table = Table(title=f"per-layer gap profiles: Pearson r over the {len(c.layers)} shared layers")
    table.add_column("language")
    pairs = list(dict.fromkeys((p.run_a, p.run_b) for p in c.profiles))
    for a, b in pairs:
        table.add_column(f"{a} vs {b}", justify="right")
    for lang in dict.fromkeys(p.language for p in c.profiles):
        cells = [p.pearson for p in c.profiles if p.language == lang]
        table.add_row(lang, *("—" if not math.isfinite(v) else f"{v:+.2f}" for v in cells))
    console.print(table)


def figure(comparison: Comparison, path: Path) -> None:
    """Per-layer gap profile of every run (CI shaded), one panel per shared language and the group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = comparison
    langs = list(dict.fromkeys(p.language for p in c.profiles))
    cols = min(4, len(langs))
    rows = math.ceil(len(langs) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, lang in zip(axes, langs, strict=False):
        for run in c.runs:
            prof = _profiles(run, c.languages, _group_of(c), c.layers)[lang]
            line, = ax.plot(c.layers, prof[0], marker=".", label=run.name)
            ax.fill_between(c.layers, prof[1], prof[2], alpha=0.2, color=line.get_color())
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(lang, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
    axes[0].set_ylabel("gap % vs English")
    axes[0].legend(fontsize=7)
    for ax in axes[len(langs):]:
        ax.set_visible(False)
    save_figure(fig, path, dpi=110)


def _group_of(c: Comparison) -> list[str]:
    return [lang for lang in c.languages if all(lang in r.low_langs for r in c.runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (or gaps.json files)")
    parser.add_argument("--out", default=None, help="folder for compare.json and compare.png (default: the first "
                        "run's reports/compare/, as `report --compare` writes)")
    parser.add_argument("--stat", default=None, help="statistic to compare (default: each report's own)")
    parser.add_argument("--bands", default=None, help="early,middle,deep layer ranges (default: thirds)")
    args = parser.parse_args(argv)
    try:
        comparison = compare([load_run(p, args.stat) for p in args.runs], args.bands)
    except UserError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        return 2
    first = Path(args.runs[0])
    # the first run's reports folder (as `report --compare` writes), or the one of a gaps.json named directly
    reports = ReportFolder(first.parent) if first.suffix == ".json" else RunDir(first).report_folder
    out = CompareFolder(args.out or reports.compare)
    write_json(out.json, comparison.to_json())
    figure(comparison, out.figure)
    console = Console()
    render(comparison, console)
    console.print(f"wrote {out.json} and {out.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The instrument check: every SAE gap beside SAE-free controls and the SAE's own fidelity per language.

An SAE statistic is a measurement through an instrument. For each language (and the medium/low
group) and each band, the panel puts side by side:
- the gap under the SAE statistic (mass by default) and under `l0`;
- the gap under `resid_norm`, the residual stream's L2 norm per token: no SAE involved;
- the position-matched gap of the SAE statistic: per parallel sentence pair only positions 1..K with
  K = the shorter sentence's token count, so languages whose sentences are longer are not compared
  on positions English never reaches;
- the language's FVE per band on held-out sentences, and dead/dense feature fractions per layer.
A control row `agrees` when it has the SAE gap's sign and both 95 % CIs exclude 0, `disagrees` when
the signs differ and both exclude 0, and is `unclear` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis.arithmetic import gap_pct
from analysis.sources import LanguageSource
from analysis.stats import cluster_bootstrap_means, nanmean, percentile_ci, quiet_nan
from toolkit.corpus import is_heldout
from toolkit.errors import UserError
from toolkit.store import ActivationFile

CONTROLS = ("l0", "resid_norm")
POSITION_MATCHED = "position-matched"
LOW_FIDELITY = 0.1  # a language's band FVE this far below the reference's is named in the headline
DENSE_RATE = 0.1  # a feature firing on more than this share of a language's tokens is dense
MIN_SHARED_POSITIONS = 2  # mean shared positions per pair below this: no position-matched comparison


@dataclass
class PanelRow:
    """The gap of one language (or the group) in one band under one measure, with its CI."""

    language: str
    band: str
    measure: str  # "mass", "l0", "resid_norm" or "position-matched"
    gap_pct: float
    ci_low: float
    ci_high: float
    agrees: str  # "" for the SAE statistic itself, else agrees / disagrees / unclear


@dataclass
class FidelityRow:
    """How well the SAE of one layer reconstructs one language (held-out sentences) and how its features fire."""

    language: str
    layer: int
    fve: float
    dead_frac: float
    dense_frac: float
    n_tokens: int


@dataclass
class InstrumentPanel:
    statistic: str
    rows: list[PanelRow] = field(default_factory=list)
    fidelity: list[FidelityRow] = field(default_factory=list)
    band_fve: dict[str, dict[str, float]] = field(default_factory=dict)  # language -> band -> mean FVE
    layer_gaps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # measure -> language -> per layer
    low_fidelity: list[str] = field(default_factory=list)  # sentences naming languages the SAEs reconstruct badly
    verdicts: list[str] = field(default_factory=list)  # one sentence per band: does the SAE gap survive?
    missing: str = ""  # why there is no panel (files without the controls)

    def row(self, language: str, band: str, measure: str) -> PanelRow | None:
        return next((r for r in self.rows if (r.language, r.band, r.measure) == (language, band, measure)), None)


def agreement(gap: float, ci: tuple[float, float], ref_gap: float, ref_ci: tuple[float, float]) -> str:
    """`agrees` (same sign, both CIs exclude 0), `disagrees` (opposite signs, both exclude 0), else `unclear`."""
    def excludes_zero(c: tuple[float, float]) -> bool:
        return bool(np.isfinite(c).all() and (c[0] > 0 or c[1] < 0))

    if not (np.isfinite(gap) and np.isfinite(ref_gap) and excludes_zero(ci) and excludes_zero(ref_ci)):
        return "unclear"
    return "agrees" if np.sign(gap) == np.sign(ref_gap) else "disagrees"


@dataclass(frozen=True)
class PanelSpec:
    """What a panel sets side by side: the languages (the reference among them), the headline group and its
    name, the layers and their bands, the SAE statistic, and the bootstrap's resamples and seed."""

    reference: str
    languages: Sequence[str]
    group: Sequence[str]
    group_name: str
    layers: Sequence[int]
    bands: Mapping[str, Sequence[int]]
    stat: str = "mass"
    n_boot: int = 1000
    seed: int = 0


def build_panel(sources: Mapping[str, LanguageSource], spec: PanelSpec) -> InstrumentPanel:
    """The instrument panel of a gap analysis; `missing` explains an empty panel (files without controls)."""
    reference, languages, group, group_name, bands, stat = (spec.reference, spec.languages, spec.group,
                                                             spec.group_name, spec.bands, spec.stat)
    layers = spec.layers
    panel = InstrumentPanel(statistic=stat)
    lacking = [str(p) for s in sources.values() for p in s.paths if not _has_controls(p, layers)]
    if lacking:
        panel.missing = (f"{len(lacking)} file(s) hold no SAE-free controls (layout v1, e.g. {lacking[0]}): "
                         "rerun extract with --overwrite to measure them")
        return panel
    layers = list(layers)
    others = [lang for lang in languages if lang != reference]
    units = np.unique(np.concatenate([s.ids for s in sources.values()]))
    measures = {m: _stat_gaps(sources, spec, units, m) for m in dict.fromkeys((stat, *CONTROLS))}
    matched = _position_matched(sources, spec, units)
    if matched is not None:
        measures[POSITION_MATCHED] = matched
    names = [*others, *([group_name] if group else [])]
    for m, (gaps, reps) in measures.items():
        if group:
            gaps[group_name] = nanmean([gaps[g] for g in group], axis=0)
            reps[group_name] = nanmean([reps[g] for g in group], axis=0)
        panel.layer_gaps[m] = {name: [float(v) for v in gaps[name]] for name in names}
    for name in names:
        for band, band_layers in bands.items():
            cols = [layers.index(layer) for layer in band_layers]
            if not cols:
                continue
            base = _band(measures[stat], name, cols)
            panel.rows.append(PanelRow(name, band, stat, *base, ""))
            for m in measures:
                if m != stat:
                    gap, low, high = _band(measures[m], name, cols)
                    panel.rows.append(PanelRow(name, band, m, gap, low, high,
                                               agreement(gap, (low, high), base[0], base[1:])))
    panel.fidelity = _fidelity(sources, languages, layers)
    panel.band_fve = _band_fve(panel.fidelity, languages, bands)
    panel.low_fidelity = _low_fidelity(panel.band_fve, reference, others)
    if group:
        panel.verdicts = [_verdict(panel, group_name, band, stat) for band in bands
                          if panel.row(group_name, band, stat)]
    if matched is None:
        panel.verdicts.append("position-matched gaps skipped: the sentence pairs share fewer than "
                              f"{MIN_SHARED_POSITIONS} token positions on average")
    return panel


def _has_controls(path, layers: Sequence[int]) -> bool:
    with ActivationFile(path) as f:
        return all(f.has_stat(layers[0], c) for c in CONTROLS)


def _stat_gaps(sources, spec: PanelSpec, units, stat: str):
    """Per-layer gap and its bootstrap replicates for every language under `stat` (as analysis.gaps does)."""
    languages, reference, layers = spec.languages, spec.reference, list(spec.layers)
    values = {lang: sources[lang].stats(layers, stat) for lang in languages}
    groups = {lang: (np.searchsorted(units, sources[lang].ids), values[lang]) for lang in languages}
    reps = cluster_bootstrap_means(groups, len(units), spec.n_boot, spec.seed)
    ref = values[reference].mean(axis=0)
    gaps = {lang: gap_pct(values[lang].mean(axis=0), ref) for lang in languages if lang != reference}
    gap_reps = {lang: gap_pct(reps[lang], reps[reference]) for lang in languages if lang != reference}
    return gaps, gap_reps


def _position_matched(sources, spec: PanelSpec, units):
    """Gap of the token mass on positions 1..K of each parallel pair, K the shorter sentence's length."""
    reference, layers = spec.reference, list(spec.layers)
    others = [lang for lang in spec.languages if lang != reference]
    ref = sources[reference]
    ref_mass = {layer: ref.token_mass(layer) for layer in layers}
    ref_offsets = ref.offsets()
    gaps, gap_reps, shared = {}, {}, []
    for lang in others:
        src = sources[lang]
        _, rows, ref_rows = np.intersect1d(src.ids, ref.ids, assume_unique=True, return_indices=True)
        offsets = src.offsets()
        k = np.minimum(np.diff(offsets)[rows], np.diff(ref_offsets)[ref_rows])
        shared.append(k)
        x = np.stack([_prefix_means(src.token_mass(layer), offsets[rows], k) for layer in layers], axis=1)
        y = np.stack([_prefix_means(ref_mass[layer], ref_offsets[ref_rows], k) for layer in layers], axis=1)
        unit = np.searchsorted(units, src.ids[rows])
        reps = cluster_bootstrap_means({"x": (unit, x), "y": (unit, y)}, len(units), spec.n_boot, spec.seed)
        gaps[lang] = gap_pct(x.mean(axis=0), y.mean(axis=0))
        gap_reps[lang] = gap_pct(reps["x"], reps["y"])
    if not shared or np.mean(np.concatenate(shared)) < MIN_SHARED_POSITIONS:
        return None
    return gaps, gap_reps


def _prefix_means(token_values: np.ndarray, starts: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Mean of token_values[start : start + k] for each (start, k); NaN where k is 0."""
    cum = np.concatenate([[0.0], np.cumsum(token_values, dtype=np.float64)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cum[starts + k] - cum[starts]) / k


def _band(measure, name: str, cols: list[int]) -> tuple[float, float, float]:
    gaps, reps = measure
    if name not in gaps:
        return np.nan, np.nan, np.nan
    with quiet_nan():
        gap = float(np.nanmean(gaps[name][cols]))
        low, high = percentile_ci(np.nanmean(reps[name][:, cols], axis=1))
    return gap, float(low), float(high)


def _fidelity(sources, languages, layers) -> list[FidelityRow]:
    out = []
    for lang in languages:
        src = sources[lang]
        held = np.array([is_heldout(str(i)) for i in src.ids], dtype=bool)
        if not held.any():  # a corpus too small for a held-out share: all sentences, said in the docs
            held[:] = True
        for layer in layers:
            sq_err, sq_dev = src.fidelity_sums(layer)
            dev = sq_dev[held].sum()
            fve = float(1 - sq_err[held].sum() / dev) if dev > 0 else np.nan
            counts, n_tokens = src.feature_counts(layer)
            rate = counts / max(n_tokens, 1)
            out.append(FidelityRow(lang, layer, fve, float(np.mean(counts == 0)), float(np.mean(rate > DENSE_RATE)),
                                   n_tokens))
    return out


def _band_fve(rows: list[FidelityRow], languages, bands) -> dict[str, dict[str, float]]:
    fve = {(r.language, r.layer): r.fve for r in rows}
    with quiet_nan():
        return {lang: {band: float(np.nanmean([fve[(lang, layer)] for layer in band_layers]))
                       for band, band_layers in bands.items() if band_layers} for lang in languages}


def _low_fidelity(band_fve, reference: str, others) -> list[str]:
    out = []
    for band, ref in band_fve.get(reference, {}).items():
        low = [f"{lang} {band_fve[lang][band]:.2f}" for lang in others
               if band_fve[lang].get(band, np.nan) < ref - LOW_FIDELITY]
        if low:
            out.append(f"{band} layers: the SAEs reconstruct {', '.join(low)} more than {LOW_FIDELITY:.1f} below "
                       f"{reference} ({ref:.2f}); their activity there partly hides in the reconstruction error")
    return out


def _verdict(panel: InstrumentPanel, name: str, band: str, stat: str) -> str:
    sae = panel.row(name, band, stat)
    ctrl = panel.row(name, band, "resid_norm")
    say = f"{band} layers: SAE {stat} {sae.gap_pct:+.1f} %, residual norm {ctrl.gap_pct:+.1f} %"
    if ctrl.agrees == "agrees":
        word = "weaker" if sae.gap_pct < 0 else "stronger"
        return f"{say}: both say {name} is {word} than the reference; the gap survives its SAE-free control"
    if ctrl.agrees == "disagrees":
        return (f"{say}: the SAE statistic and the residual control DISAGREE; this {stat} gap reflects the SAEs "
                "at least as much as the model, do not report it as a finding")
    return f"{say}: a confidence interval includes 0, so the control neither confirms nor contradicts the gap"


def require_stat(sources: Mapping[str, LanguageSource], layers: Sequence[int], stat: str) -> None:
    """A clear error when a control statistic is asked of files that do not hold it (layout v1)."""
    for src in sources.values():
        for path in src.paths:
            with ActivationFile(path) as f:
                if not f.has_stat(layers[0], stat):
                    raise UserError(f"{path} holds no {stat!r} (layout version {f.attrs.get('layout_version')}); "
                                    "rerun extract with --overwrite to measure it")
